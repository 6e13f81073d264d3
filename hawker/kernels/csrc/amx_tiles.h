/*
 * What the AMX kernels share: the permission Linux asks a process to request before it touches the tile
 * registers, and one tile configuration, every register 16 rows of 64 bytes (32 bfloat16 or 16 float32).
 * Include after immintrin.h, where __AMX_TILE__ is defined.
 */
#ifndef HAWKER_AMX_TILES_H
#define HAWKER_AMX_TILES_H

#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

enum { AMX_TILE_ROWS = 16, AMX_TILE_BYTES = 64 };

typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} AmxTileConfig;

/* The calling thread's eight tile registers as 16 x 64 bytes (a thread's configuration is its own). */
static inline void amx_configure_tiles(void) {
    AmxTileConfig config = {.palette = 1};
    for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = AMX_TILE_BYTES, config.rows[t] = AMX_TILE_ROWS;
    _tile_loadconfig(&config);
}

/* Whether this process may use the tile registers: Linux grants them on request, once per process. */
static inline int amx_permitted(void) {
    const long request_permission = 0x1023, tile_data = 18; /* ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA */
    return syscall(SYS_arch_prctl, request_permission, tile_data) == 0;
}

#endif
