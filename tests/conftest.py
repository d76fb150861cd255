"""Shared fixtures: tiny random Llama models (milliseconds) and the embedded model (loaded once)."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see factorlab/__init__.py
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# An app launched by a test never trains by itself (tests of the warm start turn it on where they need it).
os.environ["FACTORLAB_WARM_START"] = "off"

import socket
from contextlib import contextmanager

import pytest
import torch


def tiny_llama(layers: int = 2, hidden: int = 64, intermediate: int = 128, vocab: int = 128, seed: int = 0):
    """A random LlamaForCausalLM small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


class CharTokenizer:
    """A byte-level toy tokenizer for the 128-token tiny model (no chat template; 0 = end of turn and padding)."""
    chat_template = None
    eos_token_id = pad_token_id = 0

    def __len__(self):
        return 128

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [1 + ord(c) % 127 for c in text]

        class Out:
            input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids
        return Out()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 1) if 32 <= i - 1 < 127 else "?" for i in ids if not (skip_special_tokens and i == 0))


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (LoadedModel), one copy for the whole session."""
    from factorlab.models import load_model

    return load_model("default")


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    d = tmp_path / "runs"
    monkeypatch.setenv("FACTORLAB_RUNS", str(d))
    return d


@contextmanager
def served_app(runs):
    """Launch app.py in this process on a free port with a private runs folder; yields (app module, url)."""
    old = os.environ.get("FACTORLAB_RUNS")
    os.environ["FACTORLAB_RUNS"] = str(runs)
    import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, url, _ = app.launch(prevent_thread_lock=True, server_port=port, quiet=True)
    try:
        yield app, url
    finally:
        app.demo.close()
        if old is None:
            os.environ.pop("FACTORLAB_RUNS", None)
        else:
            os.environ["FACTORLAB_RUNS"] = old
