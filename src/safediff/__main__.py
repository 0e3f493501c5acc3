from safediff.cli import main_entry

main_entry()
