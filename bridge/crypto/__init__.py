"""Per-owner encryption of task data: keys, key providers and AES-256-GCM sealing.

Typical use by the domain code::

    keys = CachingKeyProvider(HttpKeyProvider(url, token=token))   # or KeyringFileProvider(path)
    key = await keys.current_key(owner)
    sealed = seal(key, payload, service=service, task_id=task_id, field="value")
    ...
    key = await keys.key_by_id(owner, sealed.key_id)
    payload = open_sealed(key, sealed, service=service, task_id=task_id, field="value")
"""

from bridge.crypto.cipher import FORMAT_VERSION, Sealed, associated_data, open_sealed, seal
from bridge.crypto.errors import BadKeyAnswer, CryptoError, KeyUnavailable, TamperedCiphertext, UnknownKey, UnknownOwner
from bridge.crypto.keyring_file import KeyringFileProvider, generate_keyring, rotate_keyring, write_keyring
from bridge.crypto.keys import KEY_SIZE, CachingKeyProvider, KeyProvider, OwnerKey
from bridge.crypto.keyserver import HttpKeyProvider

__all__ = [
    "FORMAT_VERSION",
    "KEY_SIZE",
    "BadKeyAnswer",
    "CachingKeyProvider",
    "CryptoError",
    "HttpKeyProvider",
    "KeyProvider",
    "KeyUnavailable",
    "KeyringFileProvider",
    "OwnerKey",
    "Sealed",
    "TamperedCiphertext",
    "UnknownKey",
    "UnknownOwner",
    "associated_data",
    "generate_keyring",
    "open_sealed",
    "rotate_keyring",
    "seal",
    "write_keyring",
]
