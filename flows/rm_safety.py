"""DVC stage `rm_safety`: the safety reward model (init from SFT, margin ranking loss) -> checkpoints/rm_safety/."""

from flows._rm import run

if __name__ == "__main__":
    run("rm_safety", "prefs_safety")
