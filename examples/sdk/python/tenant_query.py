"""Feishu's Python SDK with tenant tokens from lark-ticketd: the SDK never mints a token of its
own, and a token Feishu rejects is reported to lark-ticketd and the call retried once."""
import os

import lark_oapi as lark
import requests
from lark_oapi.api.tenant.v2 import QueryTenantRequest

TOKEN_URL = "{}/v1/apps/{}/tenants/{}/tenant_access_token".format(
    os.environ["LARK_TICKETD_URL"], os.environ["LARK_APP_ID"], os.environ["LARK_TENANT_KEY"]
)
AUTH = {"Authorization": "Bearer " + os.environ["LARK_TICKETD_KEY"]}
# Feishu's codes for a token it no longer accepts.
TOKEN_REJECTED = (99991663, 99991664)


def tenant_token(rejected=None):
    """The tenant token from lark-ticketd; with `rejected`, report that token as refused by
    Feishu and get the new one."""
    if rejected is None:
        response = requests.get(TOKEN_URL, headers=AUTH, timeout=10)
    else:
        response = requests.post(
            TOKEN_URL + "/invalidate", json={"token": rejected}, headers=AUTH, timeout=10
        )
    response.raise_for_status()
    return response.json()["tenant_access_token"]


# enable_set_token: every call brings its token, the SDK fetches none (and needs no app secret).
client = (
    lark.Client.builder()
    .app_id(os.environ["LARK_APP_ID"])
    .enable_set_token(True)
    .domain(os.environ.get("FEISHU_DOMAIN", lark.FEISHU_DOMAIN))
    .build()
)


def with_tenant_token(call):
    """Run `call` with lark-ticketd's tenant token; if Feishu rejects it, retry once with a new one."""
    token = tenant_token()
    response = call(lark.RequestOption.builder().tenant_access_token(token).build())
    if response.code in TOKEN_REJECTED:
        print(f"Feishu rejected the tenant token ({response.code}): retrying once with a new one")
        token = tenant_token(rejected=token)
        response = call(lark.RequestOption.builder().tenant_access_token(token).build())
    return response


response = with_tenant_token(
    lambda option: client.tenant.v2.tenant.query(QueryTenantRequest.builder().build(), option)
)
if not response.success():
    raise SystemExit(f"Feishu: {response.code} {response.msg}")
print(f"tenant: {response.data.tenant.name} ({response.data.tenant.tenant_key})")
