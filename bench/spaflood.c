/* The junk sender of the SPA flood benchmark (bench/spa_flood.py): UDP datagrams to one port from
 * many spoofed IPv4 sources, their payloads taken in turn from a file, sent with sendmmsg over a
 * raw socket (IP_HDRINCL) inside a test namespace.
 *
 *   spaflood DST PORT SECONDS FIRST_SRC NSRC PAYLOADS [PPS]
 *
 * PAYLOADS holds records of a 2-byte big-endian length and that many bytes (at most 1472: one
 * frame). UDP checksums are left 0 (none, as IPv4 allows); the kernel fills in the IP checksum.
 * PPS 0 = as fast as possible. Prints the number of datagrams sent.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAXPAY 1472
#define MAXPKT (28 + MAXPAY)
#define MAXPAYLOADS 4096

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static unsigned char pool[MAXPAYLOADS][MAXPKT];
static int lens[MAXPAYLOADS];

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s DST PORT SECONDS FIRST_SRC NSRC PAYLOADS [PPS]\n", argv[0]);
        return 2;
    }
    struct in_addr dst, first;
    if (!inet_aton(argv[1], &dst) || !inet_aton(argv[4], &first)) {
        fprintf(stderr, "spaflood: bad address\n");
        return 2;
    }
    uint16_t port = (uint16_t)atoi(argv[2]);
    double seconds = atof(argv[3]);
    uint32_t nsrc = (uint32_t)strtoul(argv[5], NULL, 10);
    double pps = argc > 7 ? atof(argv[7]) : 0;
    if (nsrc == 0) nsrc = 1;

    FILE *in = fopen(argv[6], "rb");
    if (!in) { perror("spaflood: payloads"); return 2; }
    int count = 0;
    unsigned char head[2];
    while (count < MAXPAYLOADS && fread(head, 1, 2, in) == 2) {
        int len = head[0] << 8 | head[1];
        if (len > MAXPAY) { fprintf(stderr, "spaflood: a payload of %d bytes\n", len); return 2; }
        unsigned char *p = pool[count];
        memset(p, 0, 28);
        if (len && fread(p + 28, 1, len, in) != (size_t)len) { fprintf(stderr, "spaflood: short file\n"); return 2; }
        int total = 28 + len;
        p[0] = 0x45; p[2] = total >> 8; p[3] = total & 0xff; p[8] = 64; p[9] = 17;
        memcpy(p + 16, &dst.s_addr, 4);
        p[20] = 33333 >> 8; p[21] = 33333 & 0xff; p[22] = port >> 8; p[23] = port & 0xff;
        p[24] = (8 + len) >> 8; p[25] = (8 + len) & 0xff;
        lens[count++] = total;
    }
    fclose(in);
    if (!count) { fprintf(stderr, "spaflood: no payloads\n"); return 2; }

    int fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
    if (fd < 0) { perror("spaflood: socket"); return 1; }
    int one = 1;
    setsockopt(fd, IPPROTO_IP, IP_HDRINCL, &one, sizeof one);

    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_addr = dst};
    for (int i = 0; i < BATCH; i++) {
        memset(&msgs[i], 0, sizeof msgs[i]);
        msgs[i].msg_hdr.msg_iov = &iov[i]; msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &to; msgs[i].msg_hdr.msg_namelen = sizeof to;
    }
    uint32_t base_src = ntohl(first.s_addr);
    unsigned long long sent = 0;
    uint32_t k = 0;
    double start = now(), end = start + seconds;
    for (;;) {
        double t = now();
        if (t >= end) break;
        if (pps > 0 && sent > (t - start) * pps) { usleep(200); continue; }
        for (int i = 0; i < BATCH; i++, k++) {
            unsigned char *p = pool[k % count];
            uint32_t src = htonl(base_src + (k % nsrc));
            memcpy(p + 12, &src, 4);  /* the batch is sent before any slot is written again */
            iov[i].iov_base = p; iov[i].iov_len = lens[k % count];
        }
        int r = sendmmsg(fd, msgs, BATCH, 0);
        if (r > 0) sent += r;
        else if (r < 0 && errno != ENOBUFS && errno != EAGAIN && errno != EINTR) { perror("spaflood: sendmmsg"); return 1; }
    }
    printf("%llu\n", sent);
    return 0;
}
