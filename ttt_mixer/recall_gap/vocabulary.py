"""The recall gap's word-level vocabulary: special tokens, then one token per MQAR symbol. A module of
its own, free of torch and transformers, so that the presets (read by ``--help``) can name it."""

from __future__ import annotations

from ttt_mixer.eval_tasks import recall

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
PAD_ID, EOS_ID = 0, 1
VOCAB = {token: i for i, token in enumerate(SPECIAL_TOKENS + recall.MQAR_KEYS + recall.MQAR_VALUES)}
IGNORE_INDEX = -100  # transformers' label for "no loss here"
