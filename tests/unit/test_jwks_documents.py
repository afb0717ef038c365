"""Which keys of a JWKS document are kept, and what a bad answer from the IdP does.

The IdP is an ``httpx.MockTransport`` here (the seam httpx provides); fetching from a real
server on 127.0.0.1 is ``tests/integration/test_jwks.py``.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from opsconductor.common.jwks import MAX_JWKS_BYTES, JwksKeys


def _rsa_jwk(kid: str, **extra: Any) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    return {**json.loads(RSAAlgorithm.to_jwk(key)), "kid": kid, **extra}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return {
        "keys": [
            _rsa_jwk("good"),
            _rsa_jwk("good-explicit", use="sig", alg="RS256"),
            _rsa_jwk("encryption", use="enc"),
            _rsa_jwk("ps256", alg="PS256"),
            {**json.loads(ECAlgorithm.to_jwk(ec_key)), "kid": "ec"},
            {**_rsa_jwk("no-kid"), "kid": ""},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            "not-an-object",
        ]
    }


def _keys(handler: Any) -> JwksKeys:
    return JwksKeys("https://idp.test/jwks.json", transport=httpx.MockTransport(handler))


async def test_only_rsa_signing_keys_for_rs256_are_kept(document: dict[str, Any]) -> None:
    keys = _keys(lambda request: httpx.Response(200, json=document))
    await keys.refresh()
    assert keys.kids == {"good", "good-explicit"}


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(500, text="oops"),
        httpx.Response(200, text="not json"),
        httpx.Response(200, json={"no": "keys"}),
        httpx.Response(200, content=b" " * (MAX_JWKS_BYTES + 1)),
        httpx.Response(302, headers={"location": "http://127.0.0.1/evil"}),
    ],
)
async def test_a_bad_answer_keeps_the_keys_already_known(
    document: dict[str, Any], response: httpx.Response
) -> None:
    answers = iter([httpx.Response(200, json=document), response])
    keys = _keys(lambda request: next(answers))
    await keys.refresh()
    await keys.refresh()
    assert keys.kids == {"good", "good-explicit"}
    assert keys.fetches == 2


async def test_an_unreachable_idp_leaves_no_keys_and_does_not_raise() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    keys = _keys(refuse)
    await keys.start()
    assert await keys.key_for("anything") is None
    await keys.close()
