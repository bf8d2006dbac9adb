"""`python -m rotary_gguf` runs the rotary command line."""

from rotary_gguf.cli import main

main()
