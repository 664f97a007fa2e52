// Feishu's Node SDK with tenant tokens from lark-ticketd: the SDK never mints a token of its
// own, and a token Feishu rejects is reported to lark-ticketd and the call retried once.
import * as lark from "@larksuiteoapi/node-sdk";

const { LARK_TICKETD_URL, LARK_TICKETD_KEY, LARK_APP_ID, LARK_TENANT_KEY } = process.env;
const tokenUrl = `${LARK_TICKETD_URL}/v1/apps/${LARK_APP_ID}/tenants/${LARK_TENANT_KEY}/tenant_access_token`;

// The tenant token from lark-ticketd; with `rejected`, report that token as refused by Feishu
// and get the new one.
async function tenantToken(rejected) {
  const response = await fetch(rejected ? `${tokenUrl}/invalidate` : tokenUrl, {
    method: rejected ? "POST" : "GET",
    headers: { Authorization: `Bearer ${LARK_TICKETD_KEY}`, "Content-Type": "application/json" },
    body: rejected ? JSON.stringify({ token: rejected }) : undefined,
  });
  if (!response.ok) throw new Error(`lark-ticketd: ${response.status} ${await response.text()}`);
  return (await response.json()).tenant_access_token;
}

const client = new lark.Client({
  appId: LARK_APP_ID,
  appSecret: "unused", // the constructor wants one; with the token cache off it is never sent
  disableTokenCache: true, // every call brings its token: the SDK fetches none
  // No `appType: lark.AppType.ISV`: the SDK would ask Feishu to resend the app ticket.
  domain: process.env.FEISHU_DOMAIN ?? lark.Domain.Feishu,
});

// Feishu's codes for a token it no longer accepts, sent with HTTP 400: the SDK throws.
const TOKEN_REJECTED = [99991663, 99991664];

// Run `call` with lark-ticketd's tenant token; if Feishu rejects it, retry once with a new one.
async function withTenantToken(call) {
  const token = await tenantToken();
  try {
    return await call(lark.withTenantToken(token));
  } catch (e) {
    const code = e.response?.data?.code;
    if (!TOKEN_REJECTED.includes(code)) throw e;
    console.log(`Feishu rejected the tenant token (${code}): retrying once with a new one`);
    return await call(lark.withTenantToken(await tenantToken(token)));
  }
}

const { data } = await withTenantToken((options) => client.tenant.v2.tenant.query({}, options));
console.log(`tenant: ${data.tenant.name} (${data.tenant.tenant_key})`);
