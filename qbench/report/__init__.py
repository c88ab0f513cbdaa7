"""The report wing: terminal table, Markdown, plots, results files, merging shards and comparing two runs."""
