import io

import pytest

from prep.classes import (
    build_class_table,
    is_wnid,
    read_loc_csv,
    read_map_clsloc,
    read_synset_words,
    reference_ids,
    reference_val_labels,
    reference_words,
)
from prep.errors import PrepError
from tests.conftest import SHARED_META


def test_reference_tables_are_the_real_1000_classes():
    words, ids = reference_words(), reference_ids()
    assert len(words) == len(ids) == 1000
    assert list(words) == sorted(words)  # sorted order: index = position
    assert list(words)[0] == "n01440764" and words["n01440764"].startswith("tench")
    assert sorted(ids.values()) == list(range(1, 1001))
    assert ids["n02119789"] == 1  # devkit order is NOT sorted order


def test_three_label_spaces_worked_example():
    # ILSVRC2012_val_00000001.JPEG -> n01751748 -> ID 490 -> sorted index 65 (IMAGENET.md)
    assert reference_val_labels()["ILSVRC2012_val_00000001"] == "n01751748"
    assert reference_ids()["n01751748"] == 490
    table = {c.wnid: c for c in build_class_table(reference_words())}
    assert table["n01751748"].index == 65 and table["n01751748"].ilsvrc2012_id == 490


def test_shipped_data_equals_shared_metadata():
    if not SHARED_META.is_dir():
        pytest.skip("../shared/imagenet-meta not present")
    assert read_synset_words(SHARED_META / "LOC_synset_mapping.txt") == reference_words()
    assert read_map_clsloc(SHARED_META / "map_clsloc.txt") == reference_ids()
    with open(SHARED_META / "LOC_val_solution.csv") as f:
        assert read_loc_csv(f, "shared") == reference_val_labels()


def test_shipped_val_labels_pass_the_strict_parser():
    """reference_val_labels reads the shipped CSV with one regular expression; the strict
    reader (header, one class per image, no repeats) must give the same 50,000 labels."""
    import gzip

    from prep.classes import package_data

    text = gzip.decompress(package_data("LOC_val_solution.csv.gz")).decode()
    strict = read_loc_csv(io.StringIO(text), "shipped")
    assert len(strict) == 50000 and strict == reference_val_labels()


def test_subset_class_table_is_dense_and_sorted():
    table = build_class_table(["n04389033", "n01440764", "n02114367"])
    assert [(c.index, c.wnid) for c in table] == [
        (0, "n01440764"), (1, "n02114367"), (2, "n04389033")]
    assert all(c.ilsvrc2012_id for c in table)


@pytest.mark.parametrize("name,ok", [("n01440764", True), ("n0144076", False),
                                     ("x01440764", False), ("n01440764a", False)])
def test_is_wnid(name, ok):
    assert is_wnid(name) is ok


def test_bad_lines_name_file_and_line():
    with pytest.raises(PrepError, match=r"words.txt:2: expected"):
        read_synset_words(_named("n01440764 tench\nbogus line\n", "words.txt"))
    with pytest.raises(PrepError, match=r"map.txt:1: expected"):
        read_map_clsloc(_named("n02119789 one kit_fox\n", "map.txt"))
    with pytest.raises(PrepError, match=r"loc.csv:1: expected header"):
        read_loc_csv(io.StringIO("a,b\n"), "loc.csv")
    with pytest.raises(PrepError, match=r"loc.csv:2: expected"):
        read_loc_csv(io.StringIO("ImageId,PredictionString\nx,12 3 4\n"), "loc.csv")
    with pytest.raises(PrepError, match=r"loc.csv:2: one image labelled with several"):
        read_loc_csv(io.StringIO("ImageId,PredictionString\nx,n01440764 1 2 3 4 "
                                 "n01443537 1 2 3 4\n"), "loc.csv")


def _named(text: str, name: str) -> io.StringIO:
    s = io.StringIO(text)
    s.name = name
    return s
