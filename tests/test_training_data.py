"""Reading Kaggle-layout catalogues: malformed lines, missing values, the deterministic split, packing."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from training.data import fingerprint, read_catalogue, stratified_split
from training.pack import SplitRecipe, open_catalogue, open_pack, write_pack

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName\n"


def _catalogue(root: Path, lines: list[str], images: list[str], *, nested: bool = True) -> Path:
    img_dir = root / "images" if nested else root
    img_dir.mkdir(parents=True, exist_ok=True)
    (root / "styles.csv").write_text(HEADER + "".join(line + "\n" for line in lines))
    for i in images:
        Image.new("RGB", (60, 80), (200, 10, 10)).save(img_dir / f"{i}.jpg")
    return root


def test_malformed_and_missing(tmp_path: Path) -> None:
    lines = [
        "1,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,Nike Men Blue Tshirt",
        # Unquoted commas in the title (as in the original Kaggle file): repaired, not dropped.
        "2,Women,Apparel,Topwear,Tops,Red,Summer,2012,Casual,Mango Women Red, White, Top",
        "3,Men,Footwear,Shoes,Casual Shoes,Black,Fall,2011,,Puma Men Black Shoes",  # missing usage
        "4,Men,Apparel,Topwear,Tshirts,Blue,Summer",  # too few columns
        "5,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,No Image Tshirt",  # image missing
        "1,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,Duplicate",  # duplicate id
        "x7,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,Bad Id",
        "",
    ]
    items, report = read_catalogue(_catalogue(tmp_path, lines, ["1", "2", "3", "4"]))
    assert [it.id for it in items] == ["1", "2", "3"]
    assert items[1].title == "Mango Women Red, White, Top"
    assert items[2].labels["usage"] is None
    assert report.rows == 7 and report.kept == 3 and report.repaired == 1
    assert report.skipped == {"too few columns": 1, "image missing": 1, "duplicate id": 1, "bad id": 1}
    assert report.missing_values["usage"] == 1
    assert "3/7 rows kept" in report.summary()


def test_a_spreadsheet_export_stray_quotes_and_latin1_bytes(tmp_path: Path) -> None:
    lines = [
        "1,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,Nike Men Blue Tshirt",
        '2,Women,Apparel,Topwear,Tops,Red,Summer,2012,Casual,"Mango Women Red Top',  # a stray quote
        "3,Men,Footwear,Shoes,Casual Shoes,Black,Fall,2011,Casual,Puma Men Black Shoes",
        ",,,,,,,,,",  # a row of empty cells, as spreadsheets leave them
        '4,Women,Apparel,Topwear,Tops,White,Summer,2012,Casual,"Vero Moda, Women White Top"',
    ]
    root = _catalogue(tmp_path, lines, ["1", "2", "3", "4", "5"])
    text = (root / "styles.csv").read_bytes().replace(b"productDisplayName", b"ProductDisplayName")
    # The BOM a spreadsheet writes ("no 'id' column"), and one line in Windows-1252, not UTF-8.
    latin = "5,Women,Apparel,Topwear,Tops,Red,Summer,2012,Casual,Caf\xe9 Women Red Top\n".encode("cp1252")
    (root / "styles.csv").write_bytes(b"\xef\xbb\xbf" + text + latin)
    items, report = read_catalogue(root)
    # The stray quote swallowed every line after it into one title.
    assert [it.id for it in items] == ["1", "3", "4", "5"]
    assert items[2].title == "Vero Moda, Women White Top" and items[3].title == "Caf\xe9 Women Red Top"
    assert report.skipped == {"unbalanced quote": 1, "no values": 1} and report.not_utf8 == 1
    assert "1 read as Windows-1252" in report.summary()


def test_quotes_inside_a_field_are_text_and_only_an_open_quoted_field_is_skipped(tmp_path: Path) -> None:
    lines = [
        # An inch mark in an unquoted title: text to csv (always was); counting quotes skipped the line.
        '1,Men,Apparel,Bottomwear,Jeans,Blue,Fall,2012,Casual,Levis Men 32" Blue Jeans',
        # Doubled quotes inside a quoted title, as the Kaggle file writes them.
        '2,Women,Apparel,Bottomwear,Shorts,Pink,Summer,2011,Sports,"Nike Women\'s 3.5"" Pink Short"',
        '3,Men,Apparel,Topwear,Tshirts,Red,Summer,2012,Casual,"Puma Men Red Tshirt',  # left open: skipped
        # Closed mid-field: read leniently, as before.
        '4,Men,Apparel,Topwear,Tshirts,Red,Summer,2012,Casual,"Puma Men" Red Tshirt',
    ]
    items, report = read_catalogue(_catalogue(tmp_path, lines, ["1", "2", "3", "4"]))
    titles = ['Levis Men 32" Blue Jeans', "Nike Women's 3.5\" Pink Short", "Puma Men Red Tshirt"]
    assert [it.title for it in items] == titles
    assert report.skipped == {"unbalanced quote": 1}


def test_flat_layout(tmp_path: Path) -> None:
    lines = ["10,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,A Tshirt"]
    items, _ = read_catalogue(_catalogue(tmp_path, lines, ["10"], nested=False))
    assert items[0].image == tmp_path / "10.jpg"


def test_split_is_deterministic_stratified_and_honours_forced_ids(tmp_path: Path) -> None:
    types = ["Tshirts"] * 50 + ["Shirts"] * 20 + ["Watches"] * 9 + ["Ties"]
    lines = [
        f"{i},Men,Apparel,Topwear,{t},Blue,Summer,2012,Casual,T {i}" for i, t in enumerate(types, start=1)
    ]
    root = _catalogue(tmp_path, lines, [str(i) for i in range(1, len(types) + 1)])
    items, _ = read_catalogue(root)
    train, val = stratified_split(items, val_fraction=0.2, seed=3, force_val=["1"])
    train2, val2 = stratified_split(list(reversed(items)), val_fraction=0.2, seed=3, force_val=["1"])
    assert sorted(it.id for it in val) == sorted(it.id for it in val2)
    assert fingerprint(train) == fingerprint(train2)
    assert not {it.id for it in train} & {it.id for it in val}
    per_class = {
        t: sum(1 for it in val if it.labels["articleType"] == t) for t in ("Tshirts", "Shirts", "Watches")
    }
    assert per_class["Shirts"] == 4 and per_class["Watches"] == 2
    assert "1" in {it.id for it in val}
    assert all(it.labels["articleType"] != "Ties" for it in val)  # a class of one stays in training

    # A pack holds the same split and the original bytes.
    split = SplitRecipe(val_fraction=0.2, seed=3, force_val_ids=("1",))
    packed = open_pack(write_pack(root, tmp_path / "pack", split))
    direct = open_catalogue(root, split)
    assert [it.id for it in packed.val] == [it.id for it in direct.val]
    assert packed.info["fingerprint_train"] == direct.info["fingerprint_train"]
    first = packed.train[0]
    same = next(it for it in direct.train if it.id == first.id)
    assert packed.source(first) == Path(str(direct.source(same))).read_bytes()
