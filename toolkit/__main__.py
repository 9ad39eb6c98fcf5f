"""python -m toolkit ARGS... == toolkit ARGS... (tests and benchmarks start daemons this way)."""

from toolkit.entry import main

main(prog_name="toolkit")
