"""PaliGemma tokenizer: prompts vs an independent construction, the lookup order, the errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

from flash_rt.errors import ConfigError, InputError
from flash_rt.models import paligemma_tokenizer as tok
from flash_rt.models.paligemma_tokenizer import STANDIN_TOKENIZER, PaligemmaTokenizer, find_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_standin_tokenizer.py"


@pytest.fixture(scope="module")
def sp():
    return sentencepiece.SentencePieceProcessor(model_file=str(STANDIN_TOKENIZER))


@pytest.fixture(scope="module")
def tokenizer():
    return PaligemmaTokenizer(STANDIN_TOKENIZER)


def reference_bins(state) -> list[int]:
    # Independent of np.digitize: count the 256 left bin edges -1 + k/128 that lie at or below v.
    edges = [-1.0 + k / 128.0 for k in range(256)]
    return [sum(1 for e in edges if e <= float(v)) - 1 for v in state]


def test_standin_model_has_paligemma_conventions(sp):
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert len(sp.encode("\n")) == 1 and sp.id_to_piece(sp.encode("\n")[0]) == "\n"
    assert not sp.encode("pick", out_type=str)[0].startswith("\u2581")  # no dummy prefix
    assert sp.encode("é", out_type=str) == ["<0xC3>", "<0xA9>"]  # byte fallback
    assert sp.decode(sp.encode("  two  spaces")) == "  two  spaces"  # whitespace kept (identity rule)
    assert STANDIN_TOKENIZER.stat().st_size < 512 * 1024


@pytest.mark.parametrize("prompt", ["pick up the red block", "  Put_the cup\non the plate  ", "a", ""])
@pytest.mark.parametrize("seed", [0, 1])
def test_pi05_prompt_matches_independent_construction(tokenizer, sp, prompt, seed):
    rng = np.random.default_rng(seed)
    state = rng.uniform(-1.6, 1.6, size=int(rng.integers(2, 9)))  # inside and outside [-1, 1]
    state[0] = -1.0  # bin edges exactly
    state[-1] = 1.0
    ids, mask = tokenizer.tokenize_pi05(prompt, state, max_len=200)
    text = " ".join(prompt.strip().replace("_", " ").replace("\n", " ").split(" "))
    expected_text = f"Task: {text}, State: {' '.join(str(b) for b in reference_bins(state))};\nAction: "
    expected = [2] + sp.encode(expected_text)
    assert ids.dtype == np.int64 and mask.dtype == np.bool_ and ids.shape == mask.shape == (200,)
    assert ids[: len(expected)].tolist() == expected
    assert mask.sum() == len(expected) and mask[: len(expected)].all()
    assert (ids[len(expected):] == 0).all()


def test_bins_below_minus_one_and_at_one(tokenizer):
    assert tok.discretize_state(np.array([-3.0, -1.0, 0.0, 0.999, 1.0, 7.0])).tolist() == [-1, 0, 128, 255, 255,
                                                                                          255]


@pytest.mark.parametrize("prompt", ["pick up the red block", "Open_the drawer\nnow ", "x y z"])
def test_pi0_prompt_matches_independent_construction(tokenizer, sp, prompt):
    ids, mask = tokenizer.tokenize_pi0(prompt, max_len=48)
    cleaned = prompt.strip().replace("_", " ").replace("\n", " ")
    expected = [2] + sp.encode(cleaned) + [sp.piece_to_id("\n")]
    assert ids[: len(expected)].tolist() == expected
    assert mask.tolist() == [True] * len(expected) + [False] * (48 - len(expected))


def test_too_long_prompt_states_count_and_limit(tokenizer):
    prompt = "pick up the red block " * 20
    n = 1 + len(tokenizer.encode(prompt.strip())) + 1
    with pytest.raises(InputError, match=rf"is {n} tokens, more than the model's limit of 48"):
        tokenizer.tokenize_pi0(prompt, max_len=48)
    ids, _ = tokenizer.tokenize_pi0(prompt, max_len=n)  # exactly at the limit is fine
    assert ids.shape == (n,)


def test_bad_prompt_and_state(tokenizer):
    with pytest.raises(InputError, match="prompt must be a str"):
        tokenizer.tokenize_pi0(None, 48)
    with pytest.raises(InputError, match="NaN or inf"):
        tokenizer.tokenize_pi05("go", np.array([0.1, np.nan]), 200)
    with pytest.raises(InputError, match="1-D"):
        tokenizer.tokenize_pi05("go", np.zeros((2, 2)) + 0.3, 200)


def test_not_a_paligemma_model(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="cannot load the tokenizer model"):
        PaligemmaTokenizer(bad)


def test_lookup_order(tmp_path, monkeypatch):
    explicit, env, ckpt, cache = (tmp_path / n for n in ("explicit", "env", "ckpt", "cache"))
    for d in (explicit, env, ckpt, cache):
        d.mkdir()
    (explicit / "t.model").write_bytes(b"1")
    (env / "t.model").write_bytes(b"2")
    (ckpt / "tokenizer.model").write_bytes(b"3")
    (cache / "paligemma_tokenizer.model").write_bytes(b"4")
    monkeypatch.setattr(tok, "user_cache_tokenizer", lambda: cache / "paligemma_tokenizer.model")
    monkeypatch.setenv(tok.ENV_TOKENIZER, str(env / "t.model"))
    assert find_tokenizer(explicit / "t.model", ckpt) == explicit / "t.model"
    assert find_tokenizer(None, ckpt) == env / "t.model"
    monkeypatch.delenv(tok.ENV_TOKENIZER)
    assert find_tokenizer(None, ckpt) == ckpt / "tokenizer.model"
    (ckpt / "paligemma_tokenizer.model").write_bytes(b"5")  # the PaliGemma name wins in the checkpoint
    assert find_tokenizer(None, ckpt) == ckpt / "paligemma_tokenizer.model"
    assert find_tokenizer(None, None) == cache / "paligemma_tokenizer.model"
    (cache / "paligemma_tokenizer.model").unlink()
    with pytest.raises(ConfigError) as info:
        find_tokenizer(None, tmp_path / "empty")
    message = str(info.value)
    for place in (tok.ENV_TOKENIZER, str(tmp_path / "empty" / "paligemma_tokenizer.model"),
                  str(tmp_path / "empty" / "tokenizer.model"), str(cache / "paligemma_tokenizer.model"),
                  "gs://big_vision/paligemma_tokenizer.model", "tokenizer="):
        assert place in message


def test_named_path_that_is_missing_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="is not a file"):
        find_tokenizer(tmp_path / "nope.model", None)
    monkeypatch.setenv(tok.ENV_TOKENIZER, str(tmp_path / "nope.model"))
    with pytest.raises(ConfigError, match=tok.ENV_TOKENIZER):
        find_tokenizer(None, None)


def test_training_script_reproduces_the_committed_model(tmp_path):
    spec = importlib.util.spec_from_file_location("train_standin_tokenizer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(tmp_path / "m.model") == STANDIN_TOKENIZER.read_bytes()
