from llamazip.main import entry

entry()
