/* A fast packet sender for the benchmarks: TCP SYNs or UDP datagrams from many source
 * addresses, sent with sendmmsg over a raw socket (IP_HDRINCL) inside a test namespace.
 *
 *   flood DST tcp|udp PORT SECONDS FIRST_SRC NSRC [PPS] [COUNT]
 *
 * Sources cycle through NSRC addresses starting at FIRST_SRC (dotted quad). PPS 0 = as fast as
 * possible. COUNT > 0 stops after that many packets. Prints the number of packets sent.
 * IPv6 when DST is an IPv6 address (FIRST_SRC then is one too; its last 32 bits count up).
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
#define PKT 60

static uint32_t fold(uint32_t sum) {
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return sum;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The IPv6 flood: a raw IPPROTO_RAW socket sends whole IPv6 packets (no IP checksum in IPv6);
 * the L4 checksum covers the pseudo-header, adjusted per packet for the source's last 32 bits. */
static int flood6(int argc, char **argv) {
    struct in6_addr dst, first;
    if (inet_pton(AF_INET6, argv[1], &dst) != 1 || inet_pton(AF_INET6, argv[5], &first) != 1) {
        fprintf(stderr, "flood: bad address\n");
        return 2;
    }
    int tcp = strcmp(argv[2], "tcp") == 0;
    uint16_t port = (uint16_t)atoi(argv[3]);
    double seconds = atof(argv[4]);
    uint32_t nsrc = (uint32_t)strtoul(argv[6], NULL, 10);
    double pps = argc > 7 ? atof(argv[7]) : 0;
    unsigned long long limit = argc > 8 ? strtoull(argv[8], NULL, 10) : 0;
    if (nsrc == 0) nsrc = 1;

    int fd = socket(AF_INET6, SOCK_RAW, IPPROTO_RAW);
    if (fd < 0) { perror("flood: socket"); return 1; }

    static unsigned char pkts[BATCH][PKT];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    struct sockaddr_in6 to = {.sin6_family = AF_INET6, .sin6_addr = dst};
    int l4len = tcp ? 20 : 9, len = 40 + l4len;
    uint32_t base_src;
    memcpy(&base_src, first.s6_addr + 12, 4);
    base_src = ntohl(base_src);

    /* Checksum of everything but the source's last 32 bits, per the pseudo-header. */
    uint32_t partial = (tcp ? 6 : 17) + l4len;
    for (int i = 0; i < 16; i += 2) {
        partial += (dst.s6_addr[i] << 8) | dst.s6_addr[i + 1];
        if (i < 12) partial += (first.s6_addr[i] << 8) | first.s6_addr[i + 1];
    }
    if (tcp) partial += 33333 + port + 0 + 1 + 0 + 0 + (5 << 12 | 0x02) + 64240;
    else partial += 33333 + port + 9 + (('x') << 8);
    for (int i = 0; i < BATCH; i++) {
        unsigned char *p = pkts[i];
        memset(p, 0, PKT);
        p[0] = 0x60; p[4] = l4len >> 8; p[5] = l4len & 0xff; p[6] = tcp ? 6 : 17; p[7] = 64;
        memcpy(p + 8, first.s6_addr, 16);
        memcpy(p + 24, dst.s6_addr, 16);
        unsigned char *l4 = p + 40;
        l4[0] = 33333 >> 8; l4[1] = 33333 & 0xff; l4[2] = port >> 8; l4[3] = port & 0xff;
        if (tcp) {
            l4[7] = 1; l4[12] = 5 << 4; l4[13] = 0x02; l4[14] = 64240 >> 8; l4[15] = 64240 & 0xff;
        } else {
            l4[5] = 9; l4[8] = 'x';
        }
        iov[i].iov_base = p; iov[i].iov_len = len;
        memset(&msgs[i], 0, sizeof msgs[i]);
        msgs[i].msg_hdr.msg_iov = &iov[i]; msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &to; msgs[i].msg_hdr.msg_namelen = sizeof to;
    }

    unsigned long long sent = 0;
    uint32_t k = 0;
    double start = now(), end = start + seconds;
    for (;;) {
        double t = now();
        if (t >= end || (limit && sent >= limit)) break;
        if (pps > 0 && sent > (t - start) * pps) { usleep(200); continue; }
        int n = BATCH;
        if (limit && limit - sent < (unsigned long long)n) n = (int)(limit - sent);
        for (int i = 0; i < n; i++) {
            uint32_t src = base_src + (k++ % nsrc);
            uint32_t src_be = htonl(src);
            memcpy(pkts[i] + 8 + 12, &src_be, 4);
            uint16_t sum = (uint16_t)~fold(fold(partial) + (src >> 16) + (src & 0xffff));
            unsigned char *c = pkts[i] + 40 + (tcp ? 16 : 6);
            c[0] = sum >> 8; c[1] = sum & 0xff;
        }
        int r = sendmmsg(fd, msgs, n, 0);
        if (r > 0) sent += r;
        else if (r < 0 && errno != ENOBUFS && errno != EAGAIN && errno != EINTR) { perror("flood: sendmmsg"); return 1; }
    }
    printf("%llu\n", sent);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s DST tcp|udp PORT SECONDS FIRST_SRC NSRC [PPS] [COUNT]\n", argv[0]);
        return 2;
    }
    if (strchr(argv[1], ':')) return flood6(argc, argv);
    struct in_addr dst, first;
    if (!inet_aton(argv[1], &dst) || !inet_aton(argv[5], &first)) {
        fprintf(stderr, "flood: bad address\n");
        return 2;
    }
    int tcp = strcmp(argv[2], "tcp") == 0;
    uint16_t port = (uint16_t)atoi(argv[3]);
    double seconds = atof(argv[4]);
    uint32_t nsrc = (uint32_t)strtoul(argv[6], NULL, 10);
    double pps = argc > 7 ? atof(argv[7]) : 0;
    unsigned long long limit = argc > 8 ? strtoull(argv[8], NULL, 10) : 0;
    if (nsrc == 0) nsrc = 1;

    int fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
    if (fd < 0) { perror("flood: socket"); return 1; }
    int one = 1;
    setsockopt(fd, IPPROTO_IP, IP_HDRINCL, &one, sizeof one);

    static unsigned char pkts[BATCH][PKT];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_addr = dst};
    uint32_t base_src = ntohl(first.s_addr), d = ntohl(dst.s_addr);
    int len = tcp ? 40 : 29;

    /* Checksum of everything but the source address, per the pseudo-header. */
    uint32_t partial = (d >> 16) + (d & 0xffff) + (tcp ? 6 : 17) + (tcp ? 20 : 9);
    if (tcp) partial += 33333 + port + 0 + 1 + 0 + 0 + (5 << 12 | 0x02) + 64240;
    else partial += 33333 + port + 9 + (('x') << 8);
    for (int i = 0; i < BATCH; i++) {
        unsigned char *p = pkts[i];
        memset(p, 0, PKT);
        p[0] = 0x45; p[2] = 0; p[3] = len; p[8] = 64; p[9] = tcp ? 6 : 17;
        memcpy(p + 16, &dst.s_addr, 4);
        unsigned char *l4 = p + 20;
        l4[0] = 33333 >> 8; l4[1] = 33333 & 0xff; l4[2] = port >> 8; l4[3] = port & 0xff;
        if (tcp) {
            l4[7] = 1; l4[12] = 5 << 4; l4[13] = 0x02; l4[14] = 64240 >> 8; l4[15] = 64240 & 0xff;
        } else {
            l4[5] = 9; l4[8] = 'x';
        }
        iov[i].iov_base = p; iov[i].iov_len = len;
        memset(&msgs[i], 0, sizeof msgs[i]);
        msgs[i].msg_hdr.msg_iov = &iov[i]; msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &to; msgs[i].msg_hdr.msg_namelen = sizeof to;
    }

    unsigned long long sent = 0;
    uint32_t k = 0;
    double start = now(), end = start + seconds;
    for (;;) {
        double t = now();
        if (t >= end || (limit && sent >= limit)) break;
        if (pps > 0 && sent > (t - start) * pps) { usleep(200); continue; }
        int n = BATCH;
        if (limit && limit - sent < (unsigned long long)n) n = (int)(limit - sent);
        for (int i = 0; i < n; i++) {
            uint32_t src = base_src + (k++ % nsrc);
            uint32_t nsrc_be = htonl(src);
            memcpy(pkts[i] + 12, &nsrc_be, 4);
            uint16_t sum = (uint16_t)~fold(partial + (src >> 16) + (src & 0xffff));
            unsigned char *c = pkts[i] + 20 + (tcp ? 16 : 6);
            c[0] = sum >> 8; c[1] = sum & 0xff;
        }
        int r = sendmmsg(fd, msgs, n, 0);
        if (r > 0) sent += r;
        else if (r < 0 && errno != ENOBUFS && errno != EAGAIN && errno != EINTR) { perror("flood: sendmmsg"); return 1; }
    }
    printf("%llu\n", sent);
    return 0;
}
