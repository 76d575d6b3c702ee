"""The one rule for what looks like a secret, for settings errors, MLflow params and metadata."""
import re

# A key's last part that names a secret: api_key, secret, password, token, auth...
SECRET_KEY = re.compile(r"(api_?key|secret|passw|(^|_)token$|auth)", re.IGNORECASE)
# What api_key_env must look like: the NAME of an environment variable.
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_secret_key(key: str) -> bool:
    """True for keys like `api_key` or `endpoints.judge.token`; `api_key_env` names a variable, not a secret."""
    last = str(key).rsplit(".", 1)[-1]
    return bool(SECRET_KEY.search(last)) and not last.lower().endswith("_env")
