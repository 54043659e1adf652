"""Hits for people: the web server (`retrieval serve`) and the offline HTML report."""
