/* The probe-overhead loop of `cargo xtask bench` (tests/src/bench/probes.rs).
 *
 * A TLS client and server in one process, joined by an in-memory BIO pair, so no
 * syscall or network time blurs the figure: the time of one SSL_write (or SSL_read)
 * is the library's work plus whatever the probes on it cost.
 *
 * Usage: ssl_loop CERT KEY CALLS ex|plain|sys
 * Prints "write_ns=W read_ns=R": the mean nanoseconds per call of CALLS writes of
 * 64 bytes, then of the CALLS reads that take them, each phase timed alone. "ex"
 * uses SSL_write_ex/SSL_read_ex (Python's forms), "plain" SSL_write/SSL_read
 * (curl's). "sys" times write(2) to /dev/null and read(2) from /dev/zero instead:
 * what the plain-HTTP syscall tracepoints cost every process that is not TLS.
 */
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "ssl_loop: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(1);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: ssl_loop CERT KEY CALLS ex|plain\n");
        return 2;
    }
    long calls = atol(argv[3]);
    int ex = strcmp(argv[4], "ex") == 0;
    if (strcmp(argv[4], "sys") == 0) {
        int out = open("/dev/null", O_WRONLY), in = open("/dev/zero", O_RDONLY);
        char bytes[64] = {0};
        if (out < 0 || in < 0) die("cannot open /dev/null or /dev/zero");
        double start = now_ns();
        for (long i = 0; i < calls; i++)
            if (write(out, bytes, sizeof bytes) != (ssize_t)sizeof bytes) die("a write failed");
        double written = now_ns();
        for (long i = 0; i < calls; i++)
            if (read(in, bytes, sizeof bytes) != (ssize_t)sizeof bytes) die("a read failed");
        double read_done = now_ns();
        printf("write_ns=%.1f read_ns=%.1f\n", (written - start) / (double)calls, (read_done - written) / (double)calls);
        return 0;
    }
    SSL_CTX *server_ctx = SSL_CTX_new(TLS_server_method());
    SSL_CTX *client_ctx = SSL_CTX_new(TLS_client_method());
    if (!server_ctx || !client_ctx) die("cannot make contexts");
    if (SSL_CTX_use_certificate_file(server_ctx, argv[1], SSL_FILETYPE_PEM) != 1) die("cannot load the certificate");
    if (SSL_CTX_use_PrivateKey_file(server_ctx, argv[2], SSL_FILETYPE_PEM) != 1) die("cannot load the key");
    SSL *server = SSL_new(server_ctx);
    SSL *client = SSL_new(client_ctx);
    BIO *client_bio, *server_bio;
    /* Room for every record of a phase: the writes are all made before any read. */
    size_t room = (size_t)calls * 128 + 65536;
    if (BIO_new_bio_pair(&client_bio, room, &server_bio, room) != 1) die("cannot make the BIO pair");
    SSL_set_bio(client, client_bio, client_bio);
    SSL_set_bio(server, server_bio, server_bio);
    SSL_set_connect_state(client);
    SSL_set_accept_state(server);
    for (int i = 0; i < 100 && !(SSL_is_init_finished(client) && SSL_is_init_finished(server)); i++) {
        SSL_do_handshake(client);
        SSL_do_handshake(server);
    }
    if (!SSL_is_init_finished(client) || !SSL_is_init_finished(server)) die("the handshake did not finish");
    char message[64], buffer[64];
    memset(message, 'x', sizeof message);
    double start = now_ns();
    for (long i = 0; i < calls; i++) {
        size_t done = 0;
        int ok = ex ? SSL_write_ex(client, message, sizeof message, &done) == 1
                    : SSL_write(client, message, sizeof message) == (int)sizeof message;
        if (!ok) die("a write failed");
    }
    double written = now_ns();
    for (long i = 0; i < calls; i++) {
        size_t done = 0;
        int ok = ex ? SSL_read_ex(server, buffer, sizeof buffer, &done) == 1 && done == sizeof buffer
                    : SSL_read(server, buffer, sizeof buffer) == (int)sizeof buffer;
        if (!ok) die("a read failed");
    }
    double read = now_ns();
    printf("write_ns=%.1f read_ns=%.1f\n", (written - start) / (double)calls, (read - written) / (double)calls);
    return 0;
}
