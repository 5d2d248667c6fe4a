"""The tools around the engine (command line, checkers, diagrams)."""
