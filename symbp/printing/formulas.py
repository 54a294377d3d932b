class Formulas: pass
def matrix_formulas(f, wrt): pass
