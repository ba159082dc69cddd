"""DVC stage `rm_helpful`: the helpful reward model (init from SFT, margin ranking loss) -> checkpoints/rm_helpful/."""

from flows._rm import run

if __name__ == "__main__":
    run("rm_helpful", "prefs_helpful")
