"""The per-row statistics' column indices as Triton constexprs, from their one definition
(``akl_kernels.row_results.RowStat``): the kernels store and load columns by these names."""

import triton.language as tl

from akl_kernels.row_results import N_ROW_STATS, RowStat

M_S = tl.constexpr(int(RowStat.M_S))
LOGZ_S = tl.constexpr(int(RowStat.LOGZ_S))
M_T = tl.constexpr(int(RowStat.M_T))
LOGZ_T = tl.constexpr(int(RowStat.LOGZ_T))
M_1 = tl.constexpr(int(RowStat.M_1))
LOGZ_1 = tl.constexpr(int(RowStat.LOGZ_1))
RKL = tl.constexpr(int(RowStat.RKL))
P_C = tl.constexpr(int(RowStat.P_C))
Q_C = tl.constexpr(int(RowStat.Q_C))
W_F = tl.constexpr(int(RowStat.W_F))
W_R = tl.constexpr(int(RowStat.W_R))
H_SUM = tl.constexpr(int(RowStat.H_SUM))
Q_ABOVE = tl.constexpr(int(RowStat.Q_ABOVE))
Q_BELOW = tl.constexpr(int(RowStat.Q_BELOW))
Q_REST = tl.constexpr(int(RowStat.Q_REST))
N_STATS = tl.constexpr(N_ROW_STATS)
