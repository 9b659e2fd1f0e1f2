"""Pack what `enrich bench` needs on the lent GPU machine beyond its image, into one carry-able folder.

    python scripts/device_kit.py            # -> .devkit/ (git-ignored through .git/info/exclude)

The GPU machine's image has torch, timm, Pillow, numpy, typer, rich and prometheus-client, but no Celery,
SQLAlchemy, psycopg, pydantic, boto3, moto, nanio, Redis or PostgreSQL, and it cannot download anything. The
device tool carries at most 64 MiB per call together with the working tree (about 35 MB, mostly the
model), so the kit is stripped to what the benchmark touches: wheels for the machine's Python unpacked into
a site folder (botocore and moto without the AWS services we don't call), a Redis server with the shared
libraries it needs beyond glibc, the PostgreSQL binaries of the `pgserver` wheel (relocatable, built for
manylinux2014), and real catalogue images. `scripts/device-bench` unpacks and runs it there.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"

# Distributions the benchmark imports that the GPU image lacks (its package list: the device tool's
# KINDS.md). Versions come from this checkout's .venv, so the kit runs the code as tested here.
WHEELS = [
    *("alembic", "amqp", "annotated-types", "billiard", "blinker", "boto3", "botocore", "celery", "cffi"),
    *("click-didyoumean", "click-plugins", "click-repl", "cryptography", "defusedxml", "Flask", "flask-cors"),
    *("httptools", "itsdangerous", "jmespath", "kombu", "Mako", "moto", "nanio", "obstore", "Pebble"),
    "prompt_toolkit",
    "psycopg",
    *("psycopg-binary", "pycparser", "pydantic", "pydantic_core", "pydantic-settings", "python-dotenv"),
    *("redis", "responses", "s3transfer", "SQLAlchemy", "starlette", "typing-inspection", "tzlocal"),
    *("uvicorn", "vine", "wcwidth", "xmltodict"),
]
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (34, 28, 17)] + ["manylinux2014_x86_64"]
BOTOCORE_SERVICES = {"s3", "sqs", "sts"}
# moto's packages that its S3 server imports; every other AWS service is dropped.
MOTO_KEEP = {
    "core",
    "utilities",
    "s3",
    "sqs",
    "moto_api",
    "moto_server",
    "backend_index.py",
    "backends.py",
    "server.py",
    "settings.py",
    "__init__.py",
    "py.typed",
    "proxy.py",
    "instance_metadata",
    "sts",
    "iam",
    "cloudwatch",
    "awslambda",
    "sns",
    "s3bucket_path",
    "kms",
    "cloudformation",
    "events",
}
# Redis's shared libraries that a GPU machine's image may lack, copied when this Redis links them (ldd):
# Debian's links OpenSSL for TLS, absent from slim images. glibc, libstdc++ and libsystemd (which apt
# itself needs) are left to the machine; scripts/device-bench prints any library ldd cannot find there.
REDIS_LIBS = ("liblzf.so.1", "libjemalloc.so.2", "libatomic.so.1", "libssl.so.3", "libcrypto.so.3")
# The full-size photos to carry: the catalogue's 1800x2400 ones (a quarter of the folder is 1080x1440,
# which decodes at half the cost and would flatter the full-size figures).
FULLRES_SIZE = (1800, 2400)
PG_BINARIES = ("postgres", "initdb", "pg_ctl", "pg_isready")


def pinned(names: list[str]) -> list[str]:
    frozen = subprocess.run(
        [str(REPO / ".venv/bin/pip"), "list", "--format=freeze"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    versions = {line.split("==")[0].lower().replace("_", "-"): line for line in frozen if "==" in line}
    return [versions[name.lower().replace("_", "-")] for name in names]


def download(specs: list[str], dest: Path, python: str) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         "--python-version", python, "--implementation", "cp", *platforms, "-d", str(dest), *specs],
        check=True,
    )  # fmt: skip


def build_site(wheels: Path, site: Path) -> None:
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    for data in site.glob("botocore/data/*"):
        if data.is_dir() and data.name not in BOTOCORE_SERVICES:
            shutil.rmtree(data)
    for part in site.glob("moto/*"):
        if part.name not in MOTO_KEEP:
            shutil.rmtree(part) if part.is_dir() else part.unlink()
    for cache in site.rglob("__pycache__"):
        shutil.rmtree(cache)


def linked_libraries(binary: Path) -> dict[str, Path]:
    """The shared libraries `binary` loads here, by soname (ldd's "name => path" lines)."""
    found = {}
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    for line in ldd.splitlines():
        name, arrow, rest = line.strip().partition(" => ")
        if arrow and rest.startswith("/"):
            found[name] = Path(rest.split()[0])
    return found


def copy_redis(dest: Path) -> None:
    dest.mkdir(parents=True)
    server = Path(shutil.which("redis-server") or "/usr/bin/redis-server").resolve()
    shutil.copy2(server, dest / "redis-server")
    linked = linked_libraries(server)
    for lib in REDIS_LIBS:
        if lib in linked:
            shutil.copy2(linked[lib], dest / lib)
    left = sorted(set(linked) - set(REDIS_LIBS))
    print(f"redis-server: copied {', '.join(lib for lib in REDIS_LIBS if lib in linked)}; "
          f"left to the machine: {', '.join(left)}")  # fmt: skip


def copy_postgres(wheels: Path, dest: Path) -> None:
    """The wheel's layout is kept: its binaries find libpq through RPATH $ORIGIN/../../../pgserver.libs."""
    with zipfile.ZipFile(next(wheels.glob("pgserver-*.whl"))) as archive:
        for name in archive.namelist():
            if name.endswith("/") or not name.startswith(("pgserver/pginstall/", "pgserver.libs/")):
                continue
            inside = name.removeprefix("pgserver/pginstall/")
            if inside.startswith("include/") or (inside.startswith("bin/") and inside[4:] not in PG_BINARIES):
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(name))
            if inside.startswith("bin/"):
                target.chmod(0o755)


def full_size(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        return image.size == FULLRES_SIZE


def copy_images(dest: Path, *, small: int, fullres: int) -> None:
    smalls = sorted((DATASETS / "fashion-small/images").glob("*.jpg"))[:small]
    fulls = [path for path in sorted((DATASETS / "fashion-fullres").glob("*.jpg")) if full_size(path)]
    fulls = fulls[:fullres]
    for name, paths in (("small", smalls), ("fullres", fulls)):
        (dest / name).mkdir(parents=True)
        for path in paths:
            shutil.copy2(path, dest / name / path.name)


def working_tree_bytes() -> int:
    """What the device tool carries besides the kit: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.split(b"\0")  # fmt: skip
    paths = [REPO / name.decode() for name in listed if name]
    return sum(path.stat().st_size for path in paths if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (3.12.3 in 2026-11)")
    parser.add_argument("--out", type=Path, default=REPO / ".devkit")
    parser.add_argument("--small", type=int, default=512, help="60x80 catalogue images to carry")
    parser.add_argument("--fullres", type=int, default=10, help="1800x2400 photos to carry")
    args = parser.parse_args()
    exclude = REPO / ".git/info/exclude"
    exclude.parent.mkdir(exist_ok=True)
    ignored = exclude.read_text() if exclude.exists() else ""
    if "/.devkit/" not in ignored.splitlines():
        exclude.write_text(ignored + "/.devkit/\n")
    shutil.rmtree(args.out, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="enrich-devkit-"))  # its own: two builds at once do not collide
    try:
        download(pinned(WHEELS), work / "wheels", args.python)
        download(["pgserver==0.1.4"], work / "pg-wheel", "3.11")  # only its binaries are used: any Python's
        build_site(work / "wheels", work / "kit/site")
        copy_redis(work / "kit/redis")
        copy_postgres(work / "pg-wheel", work / "kit/pg")
        args.out.mkdir(parents=True)
        with tarfile.open(args.out / "kit.tar.xz", "w:xz", preset=9) as tar:
            tar.add(work / "kit", arcname="devkit")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    copy_images(args.out / "images", small=args.small, fullres=args.fullres)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    tree = working_tree_bytes()
    print(f"{args.out}: {size / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = "
          f"{(size + tree) / 2**20:.1f} MiB (a device call carries 64 MiB in all)")  # fmt: skip
    if size + tree > 64 * 2**20:
        sys.exit("too big to carry: fewer --small or --fullres images")


if __name__ == "__main__":
    main()
