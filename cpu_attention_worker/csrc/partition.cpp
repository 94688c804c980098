#include "partition.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace apex_serve::cpu_attention {

Plan plan_pieces(const int32_t* context_lens, int64_t num_rows, int64_t block_size, int64_t bytes_per_token,
                 int num_threads) {
    Plan plan;
    int64_t total = 0;
    for (int64_t r = 0; r < num_rows; ++r) total += context_lens[r];
    const int64_t pieces = int64_t{num_threads} * kPiecesPerThread;
    const int64_t share = (total + pieces - 1) / pieces;
    const int64_t min_tokens = (kMinPieceBytes + bytes_per_token - 1) / bytes_per_token;
    const int64_t target_blocks = (std::max(share, min_tokens) + block_size - 1) / block_size;
    for (int64_t r = 0; r < num_rows; ++r) {
        const int64_t length = context_lens[r];
        const int64_t blocks = (length + block_size - 1) / block_size;
        const int64_t count = num_threads > 1 ? (blocks + target_blocks - 1) / target_blocks : 1;
        if (count <= 1) {
            plan.pieces.push_back({r, 0, length, -1});
            continue;
        }
        plan.splits.push_back({r, plan.num_partials, count});
        for (int64_t i = 0; i < count; ++i) {
            const int64_t begin = blocks * i / count * block_size;
            const int64_t end = std::min(length, blocks * (i + 1) / count * block_size);
            plan.pieces.push_back({r, begin, end, plan.num_partials++});
        }
    }
    std::stable_sort(plan.pieces.begin(), plan.pieces.end(),
                     [](const Piece& a, const Piece& b) { return a.end - a.begin > b.end - b.begin; });
    return plan;
}

void merge_partials(const Plan& plan, const float* acc, const float* max, const float* sum, int64_t num_q_heads,
                    int64_t head_dim, float* out) {
    std::vector<float> weights;
    for (const SplitRow& split : plan.splits) {
        weights.resize(static_cast<size_t>(split.count));
        for (int64_t h = 0; h < num_q_heads; ++h) {
            float top = -std::numeric_limits<float>::infinity();
            for (int64_t i = 0; i < split.count; ++i) {
                top = std::max(top, max[(split.first_partial + i) * num_q_heads + h]);
            }
            float total = 0.0f;
            for (int64_t i = 0; i < split.count; ++i) {
                const int64_t slot = (split.first_partial + i) * num_q_heads + h;
                weights[i] = std::exp(max[slot] - top);
                total += weights[i] * sum[slot];
            }
            float* dst = out + (split.row * num_q_heads + h) * head_dim;  // [head_dim]
            std::fill(dst, dst + head_dim, 0.0f);
            for (int64_t i = 0; i < split.count; ++i) {
                const float weight = weights[i] / total;
                const float* part = acc + ((split.first_partial + i) * num_q_heads + h) * head_dim;
                for (int64_t d = 0; d < head_dim; ++d) dst[d] += weight * part[d];
            }
        }
    }
}

}  // namespace apex_serve::cpu_attention
