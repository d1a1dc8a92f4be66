"""ttt_mixer.adapters: swap TTT and other sequence mixers into existing backbones (to come)."""
