param([string]$Drive = 'X:')
. "$PSScriptRoot\common.ps1"
$word = New-Object -ComObject Word.Application
$doc = $word.Documents.Add(); $doc.Content.Text = 'first'
$doc.SaveAs2("$Drive\report.docx")
& $Cairn sync | Out-Null
foreach ($text in 'second', 'third') { $doc.Content.Text = $text; $doc.Save(); & $Cairn sync | Out-Null }
$doc.Close(); $word.Quit()
$v = Versions '/report.docx'
Check 'every Word save is a version of report.docx' ($v.Count -ge 3) "$($v.Count) versions"
Check 'no ~$ owner file left or uploaded' (-not (Get-ChildItem $Drive -Force -Name | Where-Object { $_ -like '~$*' })) 'owner file left'
exit $script:Failures
