// Feishu's Go SDK with tenant tokens from lark-ticketd: the SDK never mints a token of its
// own, and a token Feishu rejects is reported to lark-ticketd and the call retried once.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log"
	"net/http"
	"os"

	lark "github.com/larksuite/oapi-sdk-go/v3"
	larkcore "github.com/larksuite/oapi-sdk-go/v3/core"
	larktenant "github.com/larksuite/oapi-sdk-go/v3/service/tenant/v2"
)

var tokenURL = fmt.Sprintf("%s/v1/apps/%s/tenants/%s/tenant_access_token",
	os.Getenv("LARK_TICKETD_URL"), os.Getenv("LARK_APP_ID"), os.Getenv("LARK_TENANT_KEY"))

// tenantToken is the tenant token from lark-ticketd; with a rejected token, it reports that
// token as refused by Feishu and gets the new one.
func tenantToken(ctx context.Context, rejected string) (string, error) {
	method, url, body := http.MethodGet, tokenURL, []byte(nil)
	if rejected != "" {
		method, url = http.MethodPost, tokenURL+"/invalidate"
		body, _ = json.Marshal(map[string]string{"token": rejected})
	}
	req, err := http.NewRequestWithContext(ctx, method, url, bytes.NewReader(body))
	if err != nil {
		return "", err
	}
	req.Header.Set("Authorization", "Bearer "+os.Getenv("LARK_TICKETD_KEY"))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("lark-ticketd: %s", resp.Status)
	}
	var answer struct {
		TenantAccessToken string `json:"tenant_access_token"`
	}
	err = json.NewDecoder(resp.Body).Decode(&answer)
	return answer.TenantAccessToken, err
}

// tokenRejected: Feishu's codes for a token it no longer accepts.
func tokenRejected(code int) bool { return code == 99991663 || code == 99991664 }

func main() {
	ctx := context.Background()
	domain := os.Getenv("FEISHU_DOMAIN")
	if domain == "" {
		domain = lark.FeishuBaseUrl
	}
	// Token cache off: every call brings its token, the SDK fetches none (nor re-sends a
	// rejected call with the same token). The secret is never sent; older SDKs want one set.
	client := lark.NewClient(os.Getenv("LARK_APP_ID"), "unused",
		lark.WithEnableTokenCache(false), lark.WithOpenBaseUrl(domain))
	query := func(token string) (*larktenant.QueryTenantResp, error) {
		return client.Tenant.V2.Tenant.Query(ctx, larkcore.WithTenantAccessToken(token))
	}

	// Call with lark-ticketd's tenant token; if Feishu rejects it, retry once with a new one.
	token, err := tenantToken(ctx, "")
	if err != nil {
		log.Fatal(err)
	}
	resp, err := query(token)
	if err == nil && tokenRejected(resp.Code) {
		fmt.Printf("Feishu rejected the tenant token (%d): retrying once with a new one\n", resp.Code)
		if token, err = tenantToken(ctx, token); err == nil {
			resp, err = query(token)
		}
	}
	if err != nil {
		log.Fatal(err)
	}
	if !resp.Success() {
		log.Fatalf("Feishu: %d %s", resp.Code, resp.Msg)
	}
	tenant := resp.Data.Tenant
	fmt.Printf("tenant: %s (%s)\n", larkcore.StringValue(tenant.Name), larkcore.StringValue(tenant.TenantKey))
}
