from sessionfsm.cli import main

main(prog_name="sessionfsm")
