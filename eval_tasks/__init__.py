"""ttt_mixer.eval_tasks: lm-eval task configs for long-context recall.

Point lm-eval at this folder with ``lm_eval --include_path $(ttt-mixer tasks-path) ...``. Groups:

- ``ttt_recall``: ``ttt_recall_synthetic`` (below) and ``ttt_recall_data``: SWDE, FDA and
  SQuAD-completion of the Based paper and their JRT "twice" variants (``ttt_swde``,
  ``ttt_swde_twice``, ...; metric ``contains``), reading the hub datasets or the local files of the
  ``recall_data_files`` option (``recall_data.py``).
- ``ttt_ppl``: ``ttt_ppl_rolling`` (word and byte perplexity, bits per byte) and
  ``ttt_ppl_position`` (``ppl@a-b`` per token-position bucket, one state through the whole
  document) on local text files (``ppl_files``) or PG19's test split (``perplexity.py``).

The ``ttt_recall_synthetic`` group holds six synthetic tasks, generated in code (``recall.py``,
``set_disjointness.py``), deterministic given a seed, and scored per context length (one metric key per length in the results
JSON):

- ``ttt_mqar``: multi-query associative recall with Zoology's generator. Keys are two-letter words
  from ``a``-``m``, values from ``n``-``z`` (disjoint halves of the symbol vocabulary, any tokenizer),
  symbols joined by spaces. ``mqar_num_kv_pairs`` pairs, then a query region whose gaps follow a power
  law (filler symbols elsewhere). One document per query; metrics ``acc@L`` (the bound value is the
  likeliest of the sequence's values, chance 1/num_kv_pairs) and ``exact_match@L`` (greedy decoding
  writes it, Zoology's argmax accuracy), L in ``mqar_seq_lengths`` (symbols).
- ``ttt_mqar_twice``: ``ttt_mqar``'s documents with the key-value pairs given
  twice before the queries (the JRT prompt); the same options and metrics.
- ``ttt_phonebook``: "Name: ddd-dddd" lines filling L tokens, then a question for one name;
  ``exact_match@L`` of the first phone number in the generation, L in ``context_lengths``.
- ``ttt_passkey``: a passkey of random digits hidden at a depth in filler text filling L tokens;
  ``exact_match@L`` of the first number in the generation, L in ``context_lengths``.
- ``ttt_set_disjointness`` and ``ttt_set_disjointness_twice`` (``set_disjointness.py``): the JRT
  paper's set disjointness, two sets of symbols sharing one element, the answer that element; the
  twice variant gives both sets twice. ``acc@L`` and ``exact_match@L`` as MQAR's, L in ``sd_lengths``
  (symbols in both sets), the first set's share ``sd_first_fraction``.

Phonebook and passkey lengths are tokens of the model's tokenizer (``pretrained`` from
``--model_args``, or ``tokenizer`` in ``--metadata``), as in lm-eval's RULER tasks: a length L holds
the prompt as lm-eval encodes it and the tokens lm-eval keeps free to generate, and may not exceed
the model's ``max_length`` (lm-eval's, from ``--model_args max_length=...`` or the model's config);
MQAR documents must fit it too. So lm-eval never cuts a prompt, which would remove the needle, keys
or queries. Options, set with
``--metadata '{"context_lengths": [512, 1024], "mqar_num_kv_pairs": 16}'``, and their defaults are
in ``options.OPTION_GROUPS``; a malformed value, a length too short for its prompt or an unknown
option with a task's prefix raises ValueError naming it.

Modules: one per task family, each with its YAMLs, and the helpers they share. Dependencies point
from the families to the helpers, never back.

- families: ``recall`` (``ttt_recall_synthetic``: MQAR read once and twice, phonebook, passkey),
  ``set_disjointness`` (in ``ttt_recall_synthetic`` too), ``recall_data`` (``ttt_recall_data``),
  ``perplexity`` (``ttt_ppl``); the YAMLs name their functions by module path
  (``!function ttt_mixer.eval_tasks.recall.mqar_dataset``).
- helpers: ``options`` (every group's options and defaults, ``OPTION_GROUPS``, and reading them from
  lm-eval's metadata), ``tokens`` (the model's tokenizer, token counts, the model's ``max_length``,
  prompts sized in tokens), ``documents`` (documents generated in code: their symbols, an RNG per
  document, the test split, the check that every choice fits the model, exact-match scoring per
  length), ``per_length`` (the task class of metrics scored per length).

A new family: its module (reading its options with ``options.task_options`` and the helpers above),
its row in ``options.OPTION_GROUPS``, its YAMLs (and, for a group, the group's YAML), and its lines in
``ttt-mixer eval --help`` (``ttt_mixer.cli.EVAL_EPILOG``).
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent


def tasks_path() -> str:
    """The folder of the task YAMLs, for ``lm_eval --include_path``."""
    return str(TASKS_DIR)
