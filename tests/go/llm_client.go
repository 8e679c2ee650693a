// A Go agent for the tests: chat completions through net/http and crypto/tls against
// the mock provider (trusted through SSL_CERT_FILE), plain and streamed, over
// HTTP/1.1 ("h1") or HTTP/2 ("h2", chosen by ALPN), or over plain HTTP/1.1 with no
// TLS at all ("plain", as to a local model server). Prints "ok" when every call
// answered 200 with its body read to the end.
//
// Usage: llm_client h1|h2|plain CALLS  (port in GAUGE_TEST_PORT, model in
// GAUGE_TEST_MODEL, default gpt-4o-mini). It first waits for a
// line on stdin, so a test can let the daemon attach to it before it calls.
package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
)

func main() {
	mode, calls := os.Args[1], os.Args[2]
	n, err := strconv.Atoi(calls)
	if err != nil {
		panic(err)
	}
	transport := &http.Transport{ForceAttemptHTTP2: true}
	if mode == "h1" {
		// A non-nil, empty TLSNextProto turns HTTP/2 off.
		transport = &http.Transport{TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{}}
	}
	client := &http.Client{Transport: transport}
	model := os.Getenv("GAUGE_TEST_MODEL")
	if model == "" {
		model = "gpt-4o-mini"
	}
	bufio.NewReader(os.Stdin).ReadString('\n')
	scheme := "https"
	if mode == "plain" {
		scheme = "http"
	}
	url := scheme + "://127.0.0.1:" + os.Getenv("GAUGE_TEST_PORT") + "/v1/chat/completions"
	for i := 0; i < n; i++ {
		stream := i%2 == 1
		body := fmt.Sprintf(`{"model":"%s","messages":[{"role":"user","content":"call %d from go"}],"stream":%t,"stream_options":%s}`,
			model, i, stream, map[bool]string{true: `{"include_usage":true}`, false: "null"}[stream])
		req, err := http.NewRequest("POST", url, bytes.NewReader([]byte(body)))
		if err != nil {
			panic(err)
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer sk-go-test-secret")
		resp, err := client.Do(req)
		if err != nil {
			fmt.Fprintln(os.Stderr, "request failed:", err)
			os.Exit(1)
		}
		out, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 {
			fmt.Fprintln(os.Stderr, "bad response:", resp.Status, err, string(out))
			os.Exit(1)
		}
		if want := map[string]string{"h1": "HTTP/1.1", "h2": "HTTP/2.0", "plain": "HTTP/1.1"}[mode]; resp.Proto != want {
			fmt.Fprintln(os.Stderr, "spoke", resp.Proto, "not", want)
			os.Exit(1)
		}
		if stream && !strings.Contains(string(out), "[DONE]") {
			fmt.Fprintln(os.Stderr, "stream did not end:", string(out))
			os.Exit(1)
		}
	}
	fmt.Println("ok")
}
