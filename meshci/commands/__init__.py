"""One module per `meshci` sub-command; see meshci/cli.py."""
