param([string]$Drive = 'X:')
. "$PSScriptRoot\common.ps1"
Set-Content "$Drive\Report.docx" 'r'
Check 'case-insensitive open' ((Get-Content "$Drive\REPORT.DOCX") -eq 'r') 'not found'
Check 'case preserved in listings' ((Get-ChildItem $Drive -Name) -ccontains 'Report.docx') 'case lost'
$refused = $false; try { [IO.File]::Open("$Drive\report.DOCX", 'CreateNew').Dispose() } catch { $refused = $true }
Check 'a colliding new name is refused' $refused 'created'

# A name made on Linux with ':' and a trailing dot (cairn put from WSL or a
# Linux machine on the same grid) shows escaped and opens by that spelling.
Set-Content "$env:TEMP\colon.txt" 'c'
& $Cairn put "$env:TEMP\colon.txt" '/a:b.' | Out-Null
$shown = "$Drive\a$([char]0xF03A)b$([char]0xF02E)"
Check 'a Linux-only name shows escaped' (Test-Path -LiteralPath $shown) 'not listed'
exit $script:Failures
