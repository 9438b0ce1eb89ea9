"""Prompt loading: the formats users have, sampling, and errors that name the line or key."""

import json

import pytest

from mixq.calib.prompts import DEFAULT_PROMPTS, PromptFileError, load_prompts


def test_builtin_default_set():
    prompts = load_prompts(None)
    assert prompts == list(DEFAULT_PROMPTS) and len(prompts) >= 32
    assert load_prompts(None, num_prompts=5) == list(DEFAULT_PROMPTS[:5])


def test_coco_json_takes_first_caption_per_image(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": [], "annotations": [
        {"image_id": 1, "id": 10, "caption": "a cat"},
        {"image_id": 1, "id": 11, "caption": "a kitten"},
        {"image_id": 2, "id": 12, "caption": "a dog"},
    ]}))
    assert load_prompts(path) == ["a cat", "a dog"]
    assert load_prompts(path, all_captions=True) == ["a cat", "a kitten", "a dog"]


def test_csv_tsv_json_list_and_text(tmp_path):
    (tmp_path / "coco.csv").write_text('file_name,text\nx.jpg,"a bus, red"\ny.jpg,a tree\n')
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\na fox\tAnimals\nthe moon\tWorld\n")
    (tmp_path / "list.json").write_text(json.dumps(["one", "two"]))
    (tmp_path / "plain.txt").write_text("first\n\n  second  \n")
    assert load_prompts(tmp_path / "coco.csv") == ["a bus, red", "a tree"]
    assert load_prompts(tmp_path / "parti.tsv") == ["a fox", "the moon"]
    assert load_prompts(tmp_path / "list.json") == ["one", "two"]
    assert load_prompts(tmp_path / "plain.txt") == ["first", "second"]


def test_seeded_sample_is_reproducible():
    a = load_prompts(None, num_prompts=6, seed=1)
    assert a == load_prompts(None, num_prompts=6, seed=1)
    assert a != load_prompts(None, num_prompts=6, seed=2)
    assert len(set(a)) == 6 and set(a) <= set(DEFAULT_PROMPTS)


def test_real_data_files(data_dir):
    coco = load_prompts(data_dir / "coco" / "captions_val2017.json")
    assert len(coco) == 5000
    assert len(load_prompts(data_dir / "coco" / "mscoco_val2014_30k.csv", num_prompts=100)) == 100
    assert len(load_prompts(data_dir / "prompts" / "PartiPrompts.tsv")) == 1632
    assert len(load_prompts(data_dir / "prompts" / "drawbench.json")) == 200


@pytest.mark.parametrize("name,content,message", [
    ("bad.json", '{"annotations": [{"image_id": 1}]}', r"annotations\[0\] has no 'caption' key"),
    ("bad2.json", '["a", 3]', "item 1 of the JSON list is int"),
    ("bad3.json", '{"a": 1,\n "b": }', "invalid JSON at line 2"),
    ("bad.csv", "file_name,description\nx.jpg,a cat\n", "line 1 \\(header\\)"),
    ("short.csv", "file_name,text\nx.jpg\n", "line 2 has no value"),
    ("empty.txt", "\n\n", "no prompts"),
])
def test_malformed_files_name_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises((PromptFileError, ValueError), match=message):
        load_prompts(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts("no/such/prompts.txt")
