"""``python -m ttt_mixer.recall_gap ARGS``: the same as ``ttt-mixer recall-gap ARGS``."""

from ttt_mixer.recall_gap import main

if __name__ == "__main__":
    main()
