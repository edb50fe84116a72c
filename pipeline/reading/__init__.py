"""Reading corpora: the launch listing of input files and parsing records into documents and dead letters."""
