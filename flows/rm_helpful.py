"""DVC stage `rm_helpful@<round>`: the helpful reward model (init from the round's policy, margin ranking loss) ->
checkpoints/<round>/rm_helpful/."""

from flows._rm import run
from flows._stage import run_stage

if __name__ == "__main__":
    run_stage(lambda: run("rm_helpful", "prefs_helpful"))
