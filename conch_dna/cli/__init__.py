"""The `conch` command and the plain trainer's command line: thin layers over the library."""
