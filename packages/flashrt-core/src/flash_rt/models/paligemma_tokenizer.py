"""The PaliGemma SentencePiece tokenizer and the prompts Pi0 / Pi0.5 are trained on.

Prompts are built exactly as openpi builds them (``PaligemmaTokenizer.tokenize``):

- text = ``prompt.strip()`` with ``"_"`` and ``"\\n"`` replaced by spaces (no lowercasing);
- Pi0: ``[BOS] + encode(text) + encode("\\n")`` - the newline is encoded on its own, as the
  "start of answer" token;
- Pi0.5: ``[BOS] + encode(f"Task: {text}, State: {bins};\\nAction: ")`` where ``bins`` is the
  UNPADDED normalised state discretised into 256 bins,
  ``np.digitize(state, np.linspace(-1, 1, 257)[:-1]) - 1`` (values below -1 give -1), joined by
  spaces;
- right-padded with id 0 to ``max_len``, with a mask that is True on real tokens. openpi truncates
  an over-long prompt with a warning; we refuse it (:class:`InputError`), since a truncated Pi0.5
  prompt silently loses the state.

The real model file (``paligemma_tokenizer.model``) ships with no checkpoint and no package; see
:func:`find_tokenizer` for where it is looked for. :data:`STANDIN_TOKENIZER` is a small model with
the same special ids and normalisation, for tests and the demo only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flash_rt.errors import ConfigError, InputError

ENV_TOKENIZER = "FLASH_RT_PALIGEMMA_TOKENIZER"
TOKENIZER_FILENAMES = ("paligemma_tokenizer.model", "tokenizer.model")
STANDIN_TOKENIZER = Path(__file__).resolve().parent / "data" / "standin_paligemma_tokenizer.model"
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
STATE_BINS = 256
HOW_TO_GET = (
    "The PaliGemma tokenizer ships with no checkpoint. Get paligemma_tokenizer.model from "
    "gs://big_vision/paligemma_tokenizer.model (e.g. `gsutil cp gs://big_vision/paligemma_tokenizer.model .`) "
    "or tokenizer.model from the Hugging Face repo google/paligemma-3b-pt-224, then pass "
    f"load_model(..., tokenizer=PATH), set {ENV_TOKENIZER}=PATH, or copy it into the checkpoint directory "
    "or the cache directory above."
)


def user_cache_tokenizer() -> Path:
    import platformdirs  # noqa: PLC0415

    return Path(platformdirs.user_cache_dir("flashrt")) / TOKENIZER_FILENAMES[0]


def find_tokenizer(explicit: str | os.PathLike | None, checkpoint_dir: str | os.PathLike | None) -> Path:
    """The tokenizer model file: ``explicit``, then $FLASH_RT_PALIGEMMA_TOKENIZER, then the checkpoint
    directory, then the user cache dir. A named path that does not exist is an error at once."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"tokenizer={str(explicit)!r} is not a file. {HOW_TO_GET}")
        return path
    looked = []
    env = os.environ.get(ENV_TOKENIZER)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ConfigError(f"{ENV_TOKENIZER}={env!r} is not a file. {HOW_TO_GET}")
        return path
    looked.append(f"${ENV_TOKENIZER} (unset)")
    if checkpoint_dir is not None:
        for name in TOKENIZER_FILENAMES:
            path = Path(checkpoint_dir).expanduser() / name
            if path.is_file():
                return path
            looked.append(str(path))
    cached = user_cache_tokenizer()
    if cached.is_file():
        return cached
    looked.append(str(cached))
    raise ConfigError(
        "no PaliGemma tokenizer found; looked at: load_model(tokenizer=None), " + ", ".join(looked) + ". "
        + HOW_TO_GET
    )


def clean_prompt(prompt: str) -> str:
    return prompt.strip().replace("_", " ").replace("\n", " ")


_STATE_BIN_EDGES = np.linspace(-1.0, 1.0, STATE_BINS + 1)[:-1]  # once, not on every predict()


def discretize_state(state: np.ndarray) -> np.ndarray:
    """256 bins over [-1, 1]: -1 for values below -1, 255 for values at or above the last edge."""
    return np.digitize(state, bins=_STATE_BIN_EDGES) - 1


def pi05_prompt_text(prompt: str, state_normalized: np.ndarray) -> str:
    bins = " ".join(str(int(b)) for b in discretize_state(state_normalized))
    return f"Task: {clean_prompt(prompt)}, State: {bins};\nAction: "


class PaligemmaTokenizer:
    """A SentencePiece model plus the Pi0 / Pi0.5 prompt formats."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece  # noqa: PLC0415

        self.path = Path(path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=self.path.read_bytes())
        except (OSError, RuntimeError) as exc:
            raise ConfigError(f"cannot load the tokenizer model {self.path}: {exc}. {HOW_TO_GET}") from exc
        if self._sp.bos_id() != BOS_ID or self._sp.pad_id() != PAD_ID:
            raise ConfigError(
                f"{self.path} is not a PaliGemma tokenizer: expected bos id {BOS_ID} and pad id {PAD_ID}, "
                f"found bos {self._sp.bos_id()} and pad {self._sp.pad_id()}"
            )

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        return list(self._sp.encode(text, add_bos=add_bos))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    # -- prompts -------------------------------------------------------------------------------
    def tokenize_pi0(self, prompt: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        _check_prompt(prompt)
        ids = self.encode(clean_prompt(prompt), add_bos=True) + self.encode("\n")
        return _pad(ids, max_len, prompt)

    def tokenize_pi05(self, prompt: str, state_normalized: np.ndarray, max_len: int) -> tuple[np.ndarray,
                                                                                              np.ndarray]:
        _check_prompt(prompt)
        state = np.asarray(state_normalized)
        if state.ndim != 1 or state.size == 0:
            raise InputError(f"state must be a 1-D array of the robot's (unpadded) dims; got shape {state.shape}")
        if not np.all(np.isfinite(state)):
            raise InputError(f"state holds NaN or inf: {state.tolist()}")
        ids = self.encode(pi05_prompt_text(prompt, state), add_bos=True)
        return _pad(ids, max_len, prompt)


def _check_prompt(prompt) -> None:
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a str (the task instruction); got {type(prompt).__name__}")


def _pad(ids: list[int], max_len: int, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    if len(ids) > max_len:
        raise InputError(
            f"prompt {prompt[:60]!r}{'...' if len(prompt) > 60 else ''} is {len(ids)} tokens, more than the "
            f"model's limit of {max_len} (max_token_len, which includes BOS and, for Pi0.5, the state); "
            f"shorten the prompt"
        )
    tokens = np.full(max_len, PAD_ID, dtype=np.int64)
    tokens[: len(ids)] = ids
    mask = np.zeros(max_len, dtype=np.bool_)
    mask[: len(ids)] = True
    return tokens, mask
