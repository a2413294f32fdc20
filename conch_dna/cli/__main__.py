"""`python -m conch_dna.cli ...` is the `conch` command (the launchd plist and systemd unit run it so)."""

from conch_dna.cli.main import app

app()
