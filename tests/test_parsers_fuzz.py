"""Property-based: arbitrary bytes or text never crash a parser the toolkit owns; they
parse or raise the toolkit's clear error (PrepError / ValueError for recipes)."""

import io

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from prep.classes import read_loc_csv, read_map_clsloc, read_synset_words
from prep.errors import PrepError
from prep.labels import parse_annotation, parse_ground_truth

# derandomize: CI runs the same cases every time (random runs found the CSV bug below and
# can be repeated locally with --hypothesis-seed)
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
XMLISH = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda a, b: f"<annotation>{a}<object><name>{b}</name></object></annotation>"
              .encode(), st.text(max_size=40), st.text(max_size=12)),
    st.sampled_from([b'<!DOCTYPE a [<!ENTITY x "y">]><annotation>&x;</annotation>',
                     b'<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><a>&x;</a>']),
)


@FUZZ
@given(XMLISH)
def test_annotation_xml(data):
    try:
        wnid = parse_annotation(data, "f.xml")
    except PrepError as exc:
        assert "f.xml" in str(exc)
    else:
        assert len(wnid) == 9 and wnid.startswith("n")


def test_loc_csv_bare_carriage_return():  # found by hypothesis: csv.Error escaped
    import pytest

    with pytest.raises(PrepError, match=r"loc.csv:\d+: malformed CSV"):
        read_loc_csv(io.StringIO("ImageId,PredictionString\nx,\"a\rb\"c\rd\n"), "loc.csv")


@FUZZ
@given(st.text(max_size=300))
def test_loc_csv(text):
    try:
        read_loc_csv(io.StringIO(text), "loc.csv")
    except PrepError as exc:
        assert "loc.csv" in str(exc)


@FUZZ
@given(st.text(max_size=300))
@example("n0144076\u0664 1 x\n")  # a non-ASCII digit in a WNID
@example("n01440764 \u00b2 x\n")  # '²'.isdigit() is True, int('²') fails
def test_synset_words_and_map_clsloc(text):
    for parser in (read_synset_words, read_map_clsloc):
        s = io.StringIO(text)
        s.name = "meta.txt"
        try:
            parser(s)
        except PrepError as exc:
            assert "meta.txt" in str(exc)


@FUZZ
@given(st.lists(st.text(max_size=8), max_size=20))
@example(["\u00b2"])  # found by hypothesis: int() raised a ValueError
def test_devkit_ground_truth(lines):
    try:
        parse_ground_truth(lines, {1: "n01440764", 2: "n01443537"}, "gt.txt")
    except PrepError as exc:
        assert "gt.txt" in str(exc)


@FUZZ
@given(st.text(max_size=200))
@example("n01440764/a.JPEG \u00b2\n")
def test_meta_split_files(tmp_path_factory, text):
    from shards.source import read_split

    data = tmp_path_factory.mktemp("d")
    (data / "meta").mkdir()
    (data / "meta" / "train.txt").write_text(text)
    try:
        read_split(data, "train", ["n01440764", "n01443537"])
    except PrepError as exc:
        assert "train.txt" in str(exc)


@FUZZ
@given(st.text(max_size=200))
def test_recipe_yaml(tmp_path_factory, text):
    import yaml

    from train.config import load_config

    path = tmp_path_factory.mktemp("r") / "r.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except (ValueError, yaml.YAMLError) as exc:
        assert "r.yaml" in str(exc) or isinstance(exc, yaml.YAMLError)
