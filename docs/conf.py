project = "datalad-udocker"
author = "datalad-udocker developers"
extensions = ["sphinx.ext.autodoc"]
html_theme = "alabaster"
exclude_patterns = ["_build"]
master_doc = "index"
