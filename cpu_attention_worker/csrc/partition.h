// Splitting a batch's attention into pieces of similar KV bytes, and merging the pieces of a
// row that was cut (log-sum-exp rescaling), so that one long request keeps every thread busy
// and short ones do not leave threads idle.
#pragma once

#include <cstdint>
#include <vector>

namespace apex_serve::cpu_attention {

// Tokens [begin, end) of row; partial: its slot among the partial results, -1 for a whole row.
struct Piece {
    int64_t row;
    int64_t begin;
    int64_t end;
    int64_t partial;
};

// A row cut into count pieces whose partial results sit in slots [first_partial, + count).
struct SplitRow {
    int64_t row;
    int64_t first_partial;
    int64_t count;
};

struct Plan {
    std::vector<Piece> pieces;  // largest first, for the dynamic schedule
    std::vector<SplitRow> splits;
    int64_t num_partials = 0;
};

// One piece per row on one thread. On more, rows longer than the target piece (about a
// quarter of a thread's share of the batch's KV bytes, at least kMinPieceBytes) are cut into
// near-equal pieces at block boundaries.
inline constexpr int kPiecesPerThread = 4;
inline constexpr int64_t kMinPieceBytes = 256 << 10;

Plan plan_pieces(const int32_t* context_lens, int64_t num_rows, int64_t block_size, int64_t bytes_per_token,
                 int num_threads);

// out[row] for every split row, from its pieces' unnormalised accumulators
// acc [num_partials, num_q_heads, head_dim], running max and sum [num_partials, num_q_heads].
void merge_partials(const Plan& plan, const float* acc, const float* max, const float* sum, int64_t num_q_heads,
                    int64_t head_dim, float* out);

}  // namespace apex_serve::cpu_attention
