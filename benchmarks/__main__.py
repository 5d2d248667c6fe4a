from benchmarks.bench import command

command(prog_name="python -m benchmarks")
