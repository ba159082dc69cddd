"""DVC stage `rm_safety@<round>`: the safety reward model (init from the round's policy, margin ranking loss) ->
checkpoints/<round>/rm_safety/."""

from flows._rm import run
from flows._stage import run_stage

if __name__ == "__main__":
    run_stage(lambda: run("rm_safety", "prefs_safety"))
