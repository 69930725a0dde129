"""Helpers every layer shares, written once: argument checks and close-match hints
(:mod:`attnlab.util.checks`), number formatting (:mod:`attnlab.util.fmt`), the rich
progress bar's columns (:mod:`attnlab.util.progress`), optional packages imported with one
message naming their extra (:mod:`attnlab.util.optional`). Statistics live in
:mod:`attnlab.stats`, file writes in :mod:`attnlab.files`.

This package sits at the bottom of the house: it imports nothing else from attnlab.
"""
