"""Reference implementations that `python -m jaxpurify.bench --compare ...` measures beside jaxpurify's steps."""
