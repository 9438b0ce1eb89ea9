"""Prompt sets: the built-in default, and loaders for the formats users have.

Formats (chosen by extension, or by content for .json):
  .json  COCO captions (official annotations: {"annotations": [{"image_id", "caption"}, ...]},
         first caption per image by default) or a JSON list of strings (DrawBench style)
  .csv   `file_name,text` (the MS-COCO 30k metadata) or any CSV with a `text`/`caption`/`prompt` column
  .tsv   PartiPrompts (`Prompt` column)
  other  plain text, one prompt per line (blank lines skipped)

COCO captions: https://cocodataset.org/#download ("2017 Train/Val annotations", file
annotations/captions_val2017.json) or the MS-COCO 30k list used by few-step diffusion papers
(`metadata.csv` of the BK-SDM repository, data/mscoco_val2014_30k).

Named sets: `proving:calibration` (or `proving:train`) draws captions of that split of the proving
ground's shapes grammar (mixq.proving.scenes); its evaluation split is kept for evaluation only.
"""

from __future__ import annotations

import csv
import io
import json
import random
import warnings
from pathlib import Path

from mixq.errors import ConfigError, PromptFileError

# Short, varied prompts of the kinds COCO holds; enough to calibrate offline with no data at all.
DEFAULT_PROMPTS = (
    "a photo of a cat sitting on a windowsill",
    "a red double-decker bus driving down a city street",
    "a bowl of fresh fruit on a wooden table",
    "a man riding a wave on a surfboard",
    "a plate with a sandwich and french fries",
    "two giraffes standing in a grassy field",
    "a living room with a couch and a television",
    "a skier going down a snowy slope",
    "a vase of sunflowers next to a window",
    "a train crossing a bridge over a river",
    "a dog catching a frisbee in a park",
    "a kitchen with white cabinets and a stove",
    "an airplane flying over the mountains at sunset",
    "a bicycle leaning against a brick wall",
    "a group of people flying kites on the beach",
    "a close-up portrait of an old man with a beard",
    "a pizza with mushrooms and olives",
    "a lighthouse on a rocky coast under a stormy sky",
    "a baseball player swinging a bat",
    "a teddy bear sitting on a bed",
    "a watercolor painting of a fox in the forest",
    "a bowl of ramen with a soft-boiled egg",
    "a clock tower in the middle of a town square",
    "an elephant walking through tall grass",
    "a laptop and a cup of coffee on a desk",
    "a boat docked at a wooden pier on a calm lake",
    "a child holding a red umbrella in the rain",
    "a futuristic city skyline at night with neon lights",
    "a horse grazing in a meadow with mountains behind",
    "a stop sign at a snowy intersection",
    "a bathroom with a white sink and a mirror",
    "an astronaut riding a horse on the moon",
)




def load_prompts(source=None, num_prompts: int | None = None, seed: int | None = None,
                 all_captions: bool = False) -> list[str]:
    """Prompts from `source` (None: the built-in set; a list of strings; or a file path).

    num_prompts: keep the first N (or a seeded sample of N when `seed` is given).
    """
    if source is None:
        prompts = list(DEFAULT_PROMPTS)
    elif isinstance(source, str) and source.startswith(PROVING_PREFIX):
        prompts = proving_prompts(source, num_prompts)
    elif isinstance(source, (list, tuple)):
        prompts = list(source)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise PromptFileError(f"prompt {i} is {type(p).__name__}, not a string: pass a list of strings")
    else:
        prompts = read_prompt_file(Path(source), all_captions=all_captions)
    prompts = capped_prompts([p.strip() for p in prompts if p and p.strip()])
    if not prompts:
        raise PromptFileError(f"no prompts in {source!r}: give at least one non-empty prompt, or None for the "
                              "built-in set")
    if num_prompts is not None:
        if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
            raise ConfigError(f"num_prompts must be an integer of at least 1, got {num_prompts!r}")
        if seed is not None:
            prompts = random.Random(seed).sample(prompts, min(num_prompts, len(prompts)))
        else:
            prompts = prompts[:num_prompts]
    return prompts


PROVING_PREFIX = "proving:"
PROVING_SPLITS = ("calibration", "train")
PROVING_DEFAULT_COUNT = 64


def proving_prompts(source: str, num_prompts: int | None) -> list[str]:
    """Captions of one split of the proving-ground grammar, deterministic (seed 0)."""
    split = source[len(PROVING_PREFIX):]
    if split not in PROVING_SPLITS:
        raise PromptFileError(f"unknown prompt set {source!r}: use one of "
                              f"{', '.join(PROVING_PREFIX + s for s in PROVING_SPLITS)} (the evaluation split is held out)")
    from mixq.proving.scenes import scenes

    count = num_prompts if isinstance(num_prompts, int) and num_prompts > 0 else PROVING_DEFAULT_COUNT
    return [text for _, text in scenes(split, count, seed=0)]


# A CLIP text encoder reads 77 tokens, a few hundred characters; text beyond cannot change an image but
# costs memory and time to tokenize (a 50 MB line took 10.7 GB). Whitespace runs are collapsed first,
# as CLIP's tokenizer does, so the cap counts characters that could become tokens.
MAX_PROMPT_CHARS = 4096
MAX_PROMPT_FILE_BYTES = 512 << 20  # COCO's largest captions file (train 2017) is 92 MB


def capped_prompts(prompts: list[str]) -> list[str]:
    """Prompts longer than MAX_PROMPT_CHARS with whitespace runs collapsed and cut to that length, with
    one short warning. Only a prefix is collapsed, so a huge line costs no more than a short one."""
    capped, cut = [], 0
    for prompt in prompts:
        if len(prompt) > MAX_PROMPT_CHARS:
            prompt = " ".join(prompt[:16 * MAX_PROMPT_CHARS].split())
            cut += len(prompt) > MAX_PROMPT_CHARS
            prompt = prompt[:MAX_PROMPT_CHARS]
        capped.append(prompt)
    if cut:
        warnings.warn(f"{cut} prompt(s) longer than {MAX_PROMPT_CHARS} characters were cut to that length (a text "
                      "encoder reads at most 77 tokens)", stacklevel=3)
    return capped


def fit_prompts_to_text_encoder(pipe, prompts: list[str]) -> list[str]:
    """Prompts the pipeline's tokenizer would truncate, cut to the tokens it keeps, with one short
    warning (diffusers' own warning would print the cut text, however long)."""
    tokenizer = getattr(pipe, "tokenizer", None)
    limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer is None or not isinstance(limit, int) or limit > 100_000:
        return list(prompts)
    keep = limit - 2  # the begin and end tokens
    fitted, cut = [], 0
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids
        if len(ids) > keep:
            prompt, cut = tokenizer.decode(ids[:keep]), cut + 1
        fitted.append(prompt)
    if cut:
        warnings.warn(f"{cut} prompt(s) longer than the text encoder's {limit} tokens were cut to fit (the text beyond "
                      "cannot change the image)", stacklevel=3)
    return fitted


def read_prompt_file(path: Path, all_captions: bool = False) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(
            f"prompts file {path} does not exist: pass a COCO captions JSON/CSV, a PartiPrompts TSV, "
            "a JSON list or a text file with one prompt per line"
        )
    if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise PromptFileError(f"prompts file {path} has {path.stat().st_size:,} bytes, more than the "
                              f"{MAX_PROMPT_FILE_BYTES >> 20} MiB mixq reads: pass a smaller file (calibration "
                              "needs tens of prompts, the report a few thousand at most)")
    text = read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json(path, text, all_captions)
    if suffix in (".csv", ".tsv"):
        return _read_table(path, text, "\t" if suffix == ".tsv" else ",")
    return text.splitlines()


def read_text(path: Path) -> str:
    """The file as UTF-8 text, a leading byte-order mark dropped (editors on Windows add one)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise PromptFileError(
            f"{path}: line {line} is not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); the file is "
            "probably Latin-1/Windows-1252: save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from err


def _read_json(path: Path, text: str, all_captions: bool) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise PromptFileError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    except RecursionError as err:
        raise PromptFileError(f"{path}: the JSON is nested too deeply to be a prompts file") from err
    if isinstance(data, list):
        for i, item in enumerate(data):
            if not isinstance(item, str):
                raise PromptFileError(f"{path}: item {i} of the JSON list is {type(item).__name__}, expected a string")
        return data
    if isinstance(data, dict) and "annotations" in data:
        return _coco_captions(path, data["annotations"], all_captions)
    raise PromptFileError(f"{path}: expected a JSON list of strings or a COCO captions file with an 'annotations' key")


def _coco_captions(path: Path, annotations, all_captions: bool) -> list[str]:
    if not isinstance(annotations, list):
        raise PromptFileError(f"{path}: 'annotations' is {type(annotations).__name__}, expected a list of "
                              "{image_id, caption} objects (COCO captions format)")
    captions, seen = [], set()
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "caption" not in ann:
            raise PromptFileError(f"{path}: annotations[{i}] has no 'caption' key (COCO captions format expected)")
        if not isinstance(ann["caption"], str):
            raise PromptFileError(f"{path}: annotations[{i}].caption is {type(ann['caption']).__name__}, "
                                  "expected a string")
        image = ann.get("image_id", i)
        if isinstance(image, (dict, list)):
            raise PromptFileError(f"{path}: annotations[{i}].image_id is {type(image).__name__}, expected a number "
                                  "or string")
        if all_captions or image not in seen:
            captions.append(ann["caption"])
            seen.add(image)
    return captions


def _read_table(path: Path, text: str, delimiter: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        columns = {c.lower(): c for c in (reader.fieldnames or [])}
        key = next((columns[c] for c in ("text", "caption", "prompt") if c in columns), None)
        if key is None:
            raise PromptFileError(
                f"{path}: line 1 (header) has columns {reader.fieldnames}; expected one named 'text', 'caption' or 'prompt'"
            )
        prompts = []
        for row in reader:
            value = row.get(key)
            if value is None:
                raise PromptFileError(f"{path}: line {reader.line_num} has no value in column {key!r}")
            prompts.append(value)
        return prompts
    except csv.Error as err:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise PromptFileError(f"{path}: line {reader.line_num} is not valid {kind}: {err}") from err
