"""The dataset side: the OCI layout in git, layers as git-annex keys with
registry URLs, and the read-only special remote that fetches them back."""
