from sessionfsm.tools import main

main()
