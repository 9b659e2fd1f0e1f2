#!/bin/sh
# One-shot MinIO setup for docker-compose.yml (runs in the minio/mc image):
#   1. the bucket, 2. a webhook notification target pointing at the ingest service, authenticated with the
#   shared ENRICH_WEBHOOK_SECRET (MinIO sends it as "Authorization: Bearer <token>"), 3. an event rule
#   sending every object-created event of the bucket to that target. Safe to run again.
set -eu

: "${MINIO_URL:=http://minio:9000}"
: "${MINIO_BUCKET:=uploads}"
: "${WEBHOOK_ENDPOINT:=http://ingest:8080/events}"
TARGET_ID=enrich
ARN="arn:minio:sqs::${TARGET_ID}:webhook"

mc alias set local "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "local/${MINIO_BUCKET}"

# queue_dir keeps undelivered events on disk (a volume of the minio service) while ingest is down.
mc admin config set local "notify_webhook:${TARGET_ID}" \
  endpoint="${WEBHOOK_ENDPOINT}" \
  auth_token="${ENRICH_WEBHOOK_SECRET}" \
  queue_dir=/events \
  queue_limit=100000
# Older MinIO releases only load notification targets at start-up.
mc admin service restart local --json >/dev/null 2>&1 || true
i=0
until mc ready local >/dev/null 2>&1; do
  i=$((i + 1))
  [ "$i" -gt 60 ] && { echo "minio did not come back" >&2; exit 1; }
  sleep 1
done

if mc event ls "local/${MINIO_BUCKET}" "$ARN" 2>/dev/null | grep -q "$ARN"; then
  echo "event rule already present"
else
  mc event add "local/${MINIO_BUCKET}" "$ARN" --event put
fi
mc event ls "local/${MINIO_BUCKET}"
echo "bucket ${MINIO_BUCKET} -> ${WEBHOOK_ENDPOINT}: ready"
