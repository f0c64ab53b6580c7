"""The offline demo model: its data (Tux Paint stamps and emoji, rule-annotated), its towers, the cached-feature
training of its heads and the build that exports it (``hqclip demo build``)."""
