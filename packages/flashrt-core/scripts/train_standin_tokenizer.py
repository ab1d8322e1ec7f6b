"""Train the stand-in PaliGemma tokenizer shipped as flash_rt/models/data/standin_paligemma_tokenizer.model.

The real PaliGemma SentencePiece model cannot be downloaded here and ships in no package. Tests and
the demo use this stand-in: a small BPE model with the same special ids (pad 0, eos 1, bos 2,
unk 3) and the same normalisation choices (no dummy prefix, identity normalisation, extra
whitespace kept, digits split, byte fallback, "\\n" its own piece), trained on a synthetic corpus of
robot instructions and Pi0.5-style prompts. Its ids mean nothing to a real checkpoint.

Deterministic: the corpus comes from a fixed seed. Run from the repository root:
    python packages/flashrt-core/scripts/train_standin_tokenizer.py
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import sentencepiece as spm

OUT = Path(__file__).resolve().parents[1] / "src/flash_rt/models/data/standin_paligemma_tokenizer.model"
VOCAB_SIZE = 1024
SEED = 0

VERBS = ["pick up", "put", "place", "move", "open", "close", "push", "pull", "turn on", "turn off", "stack",
         "grab", "lift", "rotate", "slide", "insert", "wipe", "pour", "fold", "hang", "drop", "take"]
OBJECTS = ["the red block", "the blue cup", "a bowl", "the black bowl", "the plate", "the drawer", "the mug",
           "the cream cheese", "the ketchup", "the alphabet soup", "the towel", "the spoon", "a sponge",
           "the microwave", "the stove", "the cabinet door", "the wine bottle", "the basket", "the lid",
           "the green pepper", "the tomato sauce", "the butter", "the book", "the marker", "the box"]
PLACES = ["on the plate", "in the basket", "into the drawer", "on top of the cabinet", "to the left",
          "to the right", "next to the sink", "on the stove", "in the bowl", "onto the shelf", "on the table",
          "behind the box", "in front of the robot", "into the microwave", "on the tray"]
EXTRAS = ["", "", " carefully", " slowly", " and then stop", " please", " quickly", ", then return home"]


def sentences(rng: random.Random, count: int):
    for _ in range(count):
        task = f"{rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}{rng.choice(EXTRAS)}"
        if rng.random() < 0.3:
            task = task.capitalize()
        if rng.random() < 0.2:
            task = task.replace(" ", "_")
        kind = rng.random()
        if kind < 0.5:
            state = " ".join(str(rng.randrange(256)) for _ in range(rng.randrange(2, 33)))
            yield f"Task: {task}, State: {state};\nAction: "
        elif kind < 0.8:
            yield task + "\n"
        else:
            yield f"{task}. The robot should {rng.choice(VERBS)} {rng.choice(OBJECTS)}."


def main(out: Path = OUT) -> bytes:
    rng = random.Random(SEED)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(rng, 20000),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["\n"],
        byte_fallback=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    print(f"wrote {out} ({len(model.getvalue())} bytes, vocab {VOCAB_SIZE})")
    return model.getvalue()


if __name__ == "__main__":
    main()
